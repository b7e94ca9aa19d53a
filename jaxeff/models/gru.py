r"""A GRU layer over padded sequences, and its time loop with a hand-written backward pass.

The equations are PyTorch's ``nn.GRU`` (Cho et al., "Learning Phrase Representations
using RNN Encoder-Decoder for Statistical Machine Translation", EMNLP 2014,
https://arxiv.org/abs/1406.1078), the text encoder of VSE++ (Faghri et al., BMVC 2018,
https://arxiv.org/abs/1707.05612):

.. math::

    \begin{aligned}
    r_t &= \sigma(a^x_{r,t} + W_{hr} h_{t-1} + b_{hr}), \qquad
    z_t = \sigma(a^x_{z,t} + W_{hz} h_{t-1} + b_{hz}) \\
    n_t &= \tanh(a^x_{n,t} + r_t \odot (W_{hn} h_{t-1} + b_{hn})), \qquad
    h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}
    \end{aligned}

with the input projection ``a^x_t = W_i x_t + b_i`` of all steps computed as one matrix
product before the loop.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.models.layers import check_floating, symmetric_uniform

__all__ = ["GRU", "check_unroll", "gru_sequence", "gru_update", "resolve_unroll"]


def _gates(state, input_proj, hidden_kernel, hidden_bias):
    """``(r, z, n, W_hn h + b_hn)`` of one step from the projected input ``a^x_t``."""
    hidden_proj = state @ hidden_kernel + hidden_bias
    x_r, x_z, x_n = jnp.split(input_proj, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hidden_proj, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return r, z, n, h_n


def gru_update(state, input_proj, hidden_kernel, hidden_bias):
    """One GRU step ``h_t`` from ``h_{t-1}`` (``(B, H)``) and ``a^x_t`` (``(B, 3H)``)."""
    r, z, n, _ = _gates(state, input_proj, hidden_kernel, hidden_bias)
    del r
    return (1.0 - z) * n + z * state


def _run(inputs, mask, params, initial_state, unroll, *, save: bool):
    """The input projection and the time loop; with ``save`` also the gates the backward
    pass needs."""
    input_kernel, input_bias, hidden_kernel, hidden_bias = params
    projected = inputs @ input_kernel  # (L, B, 3H); the bias is added inside the loop

    def step(state, xs):
        x_proj, valid = xs
        r, z, n, h_n = _gates(state, x_proj + input_bias, hidden_kernel, hidden_bias)
        state = jnp.where(valid, (1.0 - z) * n + z * state, state)
        return state, ((state, r, z, n, h_n) if save else state)

    _, ys = jax.lax.scan(step, initial_state, (projected, mask), unroll=unroll)
    return ys


def gru_sequence(
    inputs, mask, input_kernel, input_bias, hidden_kernel, hidden_bias, initial_state, unroll=1
):
    r"""A GRU layer over time-major sequences: ``(L, B, D)`` inputs → ``(L, B, H)`` states.

    Projects every step's input at once, :math:`a^x_t = W_i x_t + b_i` (one matrix
    product), then runs :math:`h_t` (module docstring) for ``t = 1..L`` from
    ``h_0 = initial_state``; where ``mask[t, b]`` is false the state of sequence ``b`` is
    held, so ``outputs[-1]`` is each sequence's state after its last real step whatever the
    padding.

    The backward pass is written by hand. One reverse loop carries ``∂h`` and emits the
    gate pre-activation cotangents :math:`\delta_t = (\delta^r_t, \delta^z_t,
    \delta^n_t)`; each weight gradient is then one product over all steps and examples,
    :math:`\nabla W_h = \sum_t h_{t-1}^\top [\delta^r_t, \delta^z_t, \delta^n_t \odot
    r_t]` and :math:`\nabla W_i = \sum_t x_t^\top \delta_t`, laid out as the weights
    are, instead of a small product and a full-size accumulation inside every step (the
    loop's automatic derivative) and transposed products after it. The numbers equal
    automatic differentiation of the loop up to float rounding (tested). Forward-mode
    differentiation (``jax.jvp``) is not defined for it.

    Args:
        inputs: ``(L, B, D)`` inputs ``x_t``.
        mask: ``(L, B, 1)`` booleans, true at each sequence's real steps.
        input_kernel: ``(D, 3H)`` input weights (``weight_ih_l0.T`` in PyTorch), gate order
            r, z, n.
        input_bias: ``(3H,)`` input bias.
        hidden_kernel: ``(H, 3H)`` recurrent weights (``weight_hh_l0.T`` in PyTorch).
        hidden_bias: ``(3H,)`` recurrent bias.
        initial_state: ``(B, H)`` state ``h_0``.
        unroll: time steps per loop iteration (``jax.lax.scan``'s ``unroll``; ``True`` for
            all), in both passes. Unrolling saves loop overhead and lets the compiler fuse
            across steps, at the cost of compile time.

    Returns:
        ``(L, B, H)`` states after each step.

    Raises:
        ValueError: naming the argument whose shape, dtype or value does not fit.
    """
    _check_sequence_args(
        inputs, mask, input_kernel, input_bias, hidden_kernel, hidden_bias, initial_state
    )
    return _gru_sequence(
        inputs,
        mask,
        input_kernel,
        input_bias,
        hidden_kernel,
        hidden_bias,
        initial_state,
        check_unroll(unroll),
    )


def _check_sequence_args(
    inputs, mask, input_kernel, input_bias, hidden_kernel, hidden_bias, initial_state
):
    check_floating("inputs", inputs, rank=3, what="(L, B, D)")
    check_floating("hidden_kernel", hidden_kernel, rank=2, what="(H, 3H)")
    length, batch, features = jnp.shape(inputs)
    hidden = jnp.shape(hidden_kernel)[0]
    expected = {
        "hidden_kernel": (jnp.shape(hidden_kernel), (hidden, 3 * hidden)),
        "mask": (jnp.shape(mask), (length, batch, 1)),
        "input_kernel": (jnp.shape(input_kernel), (features, 3 * hidden)),
        "input_bias": (jnp.shape(input_bias), (3 * hidden,)),
        "hidden_bias": (jnp.shape(hidden_bias), (3 * hidden,)),
        "initial_state": (jnp.shape(initial_state), (batch, hidden)),
    }
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(
                f"`{name}` must have shape {want} for inputs of shape (L, B, D) = "
                f"{(length, batch, features)} and H = {hidden}, got {got}."
            )
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"`mask` must be a boolean array, got dtype {jnp.result_type(mask)}.")


def check_unroll(unroll) -> int | bool:
    """``unroll`` checked to be ``True`` (every step) or an int ``>= 1``."""
    if unroll is True or (isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1):
        return unroll
    raise ValueError(
        f"`unroll` must be True (every step) or an int >= 1 (steps per loop iteration), "
        f"got {unroll!r}."
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _gru_sequence(
    inputs, mask, input_kernel, input_bias, hidden_kernel, hidden_bias, initial_state, unroll
):
    params = (input_kernel, input_bias, hidden_kernel, hidden_bias)
    return _run(inputs, mask, params, initial_state, unroll, save=False)


def _sequence_fwd(
    inputs, mask, input_kernel, input_bias, hidden_kernel, hidden_bias, initial_state, unroll
):
    params = (input_kernel, input_bias, hidden_kernel, hidden_bias)
    outputs, r, z, n, h_n = _run(inputs, mask, params, initial_state, unroll, save=True)
    return outputs, (
        inputs,
        mask,
        input_kernel,
        hidden_kernel,
        initial_state,
        outputs,
        r,
        z,
        n,
        h_n,
    )


def _sequence_bwd(unroll, residuals, d_outputs):
    inputs, mask, input_kernel, hidden_kernel, initial_state, outputs, r, z, n, h_n = residuals
    previous = jnp.concatenate([initial_state[None], outputs[:-1]])  # h_{t-1}
    hidden_kernel_t = hidden_kernel.T

    def step(dh, xs):
        d_out, h_prev, r, z, n, h_n, valid = xs
        dh = dh + d_out
        d_n = dh * (1.0 - z) * (1.0 - n * n)  # through tanh
        d_z = dh * (h_prev - n) * z * (1.0 - z)  # through sigmoid
        d_r = d_n * h_n * r * (1.0 - r)
        d_x = jnp.where(valid, jnp.concatenate([d_r, d_z, d_n], axis=-1), 0.0)
        d_h = jnp.where(valid, jnp.concatenate([d_r, d_z, d_n * r], axis=-1), 0.0)
        dh = jnp.where(valid, dh * z, dh) + d_h @ hidden_kernel_t
        return dh, (d_x, d_h)

    d_state, (d_projected, d_hidden) = jax.lax.scan(
        step,
        jnp.zeros_like(initial_state),
        (d_outputs, previous, r, z, n, h_n, mask),
        reverse=True,
        unroll=unroll,
    )
    d_inputs = jnp.einsum("lbg,dg->lbd", d_projected, input_kernel)
    d_input_kernel = jnp.einsum("lbd,lbg->dg", inputs, d_projected)
    d_input_bias = jnp.sum(d_projected, axis=(0, 1))
    d_hidden_kernel = jnp.einsum("lbh,lbg->hg", previous, d_hidden)
    d_hidden_bias = jnp.sum(d_hidden, axis=(0, 1))
    return (
        d_inputs,
        None,
        d_input_kernel,
        d_input_bias,
        d_hidden_kernel,
        d_hidden_bias,
        d_state,
    )


_gru_sequence.defvjp(_sequence_fwd, _sequence_bwd)


def resolve_unroll(unroll: int | bool | None) -> int | bool:
    """``unroll`` checked (:func:`check_unroll`), or for ``None`` the backend's default:
    all steps on GPU and TPU, one per loop iteration on CPU."""
    if unroll is None:
        return 1 if jax.default_backend() == "cpu" else True
    return check_unroll(unroll)


def _bias(projection: nnx.Linear) -> jax.Array:
    """The bias of one of the GRU's projections (both are built with one)."""
    assert projection.bias is not None
    return projection.bias[...]


class GRU(nnx.Module):
    r"""A GRU layer over padded sequences, with the equations of PyTorch's ``nn.GRU``.

    .. math::

        \begin{aligned}
        r_t &= \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}) \\
        z_t &= \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}) \\
        n_t &= \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})) \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}
        \end{aligned}

    Unlike ``nnx.GRUCell``, the recurrent projection has a bias (``b_hn`` sits inside the
    reset gate), so weights of the reference model map one to one: ``input_proj.kernel``
    is ``weight_ih_l0.T`` and ``hidden_proj.kernel`` is ``weight_hh_l0.T`` (gate order
    r, z, n). Every weight and bias starts at ``U(-1/sqrt(H), 1/sqrt(H))``, as PyTorch.

    The input projection of all time steps is one matrix product; only the recurrent part
    runs in a loop (:func:`gru_sequence`, with its hand-written backward pass). Past a
    sequence's length its state stops changing, so the final state is the state at the
    last real step whatever the padding.

    Args:
        in_features: size of the inputs ``x_t``.
        hidden_features: size of the state ``h_t``.
        unroll: time steps per loop iteration (see :func:`gru_sequence`). ``None`` (the
            default) unrolls the whole sequence on GPU and TPU, where every loop iteration
            adds launch and synchronisation overhead (one H200: 1.2 → 0.9 ms for the
            reference VSE++ step), and does not unroll on CPU, where the gain is a few
            percent and compile time grows with the length.
        rngs: random streams for the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        unroll: int | bool | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.unroll = unroll if unroll is None else check_unroll(unroll)
        init = symmetric_uniform(1.0 / math.sqrt(hidden_features))
        self.input_proj = nnx.Linear(
            in_features, 3 * hidden_features, kernel_init=init, bias_init=init, rngs=rngs
        )
        self.hidden_proj = nnx.Linear(
            hidden_features, 3 * hidden_features, kernel_init=init, bias_init=init, rngs=rngs
        )

    def initial_state(
        self, batch_size: int, dtype: jax.typing.DTypeLike = jnp.float32
    ) -> jax.Array:
        """The zero state ``h_0`` of shape ``(batch_size, hidden_features)``."""
        return jnp.zeros((batch_size, self.hidden_features), dtype)

    def step(self, state: jax.Array, inputs: jax.Array) -> jax.Array:
        """One time step (the GRU cell): ``(B, H)`` state and ``(B, D)`` inputs → new state."""
        return gru_update(
            state, self.input_proj(inputs), self.hidden_proj.kernel[...], _bias(self.hidden_proj)
        )

    def __call__(
        self,
        inputs: jax.Array,
        lengths: jax.Array,
        *,
        initial_state: jax.Array | None = None,
        time_major: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the GRU over padded sequences of the given ``(B,)`` lengths.

        Args:
            inputs: ``(B, L, in_features)`` padded sequences, or ``(L, B, in_features)``
                with ``time_major=True`` (the loop's own layout: no transpositions then).
            lengths: ``(B,)`` number of real steps of each sequence.
            initial_state: ``(B, hidden_features)``; zeros by default.
            time_major: whether time is the leading axis of ``inputs`` and of the outputs.

        Returns:
            ``(outputs, final_state)``: ``(B, L, H)`` (or ``(L, B, H)``) states after each
            step, held at the final state past each length, and the ``(B, H)`` state after
            the last real step.
        """
        if not time_major:
            inputs = jnp.swapaxes(inputs, 0, 1)
        length, batch = inputs.shape[0], inputs.shape[1]
        mask = (jnp.arange(length)[:, None] < lengths[None, :])[..., None]  # (L, B, 1)
        if initial_state is None:
            initial_state = self.initial_state(batch, inputs.dtype)
        outputs = gru_sequence(
            inputs,
            mask,
            self.input_proj.kernel[...],
            _bias(self.input_proj),
            self.hidden_proj.kernel[...],
            _bias(self.hidden_proj),
            initial_state,
            resolve_unroll(self.unroll),
        )
        final_state = outputs[-1]
        if not time_major:
            outputs = jnp.swapaxes(outputs, 0, 1)
        return outputs, final_state
