"""Caption encoder of VSE++: word embedding → GRU → state at the last real token.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.models.layers import (
    check_tokens_and_lengths,
    is_concrete,
    l2_normalize,
    symmetric_uniform,
)


def _gru_update(state, input_proj, hidden_kernel, hidden_bias):
    """One GRU update from the already projected input ``W_i x + b_i``."""
    hidden_proj = state @ hidden_kernel + hidden_bias
    x_r, x_z, x_n = jnp.split(input_proj, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(hidden_proj, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1.0 - z) * n + z * state


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
    runs in a ``lax.scan``. Past a sequence's length its state stops changing, so the final
    state is the state at the last real step whatever the padding.

    Args:
        in_features: size of the inputs ``x_t``.
        hidden_features: size of the state ``h_t``.
        rngs: random streams for the initialisation.
    """

    def __init__(self, in_features: int, hidden_features: int, *, rngs: nnx.Rngs):
        self.in_features = in_features
        self.hidden_features = hidden_features
        init = symmetric_uniform(1.0 / math.sqrt(hidden_features))
        self.input_proj = nnx.Linear(
            in_features, 3 * hidden_features, kernel_init=init, bias_init=init, rngs=rngs
        )
        self.hidden_proj = nnx.Linear(
            hidden_features, 3 * hidden_features, kernel_init=init, bias_init=init, rngs=rngs
        )

    def initial_state(self, batch_size: int, dtype=jnp.float32):
        """The zero state ``h_0`` of shape ``(batch_size, hidden_features)``."""
        return jnp.zeros((batch_size, self.hidden_features), dtype)

    def step(self, state, inputs):
        """One time step (the GRU cell): ``(B, H)`` state and ``(B, D)`` inputs → new state."""
        return _gru_update(
            state, self.input_proj(inputs), self.hidden_proj.kernel[...], self.hidden_proj.bias[...]
        )

    def __call__(self, inputs, lengths, *, initial_state=None):
        """Runs the GRU over ``(B, L, D)`` inputs of the given ``(B,)`` lengths.

        Args:
            inputs: ``(B, L, in_features)`` padded sequences.
            lengths: ``(B,)`` number of real steps of each sequence.
            initial_state: ``(B, hidden_features)``; zeros by default.

        Returns:
            ``(outputs, final_state)``: ``(B, L, H)`` states after each step (held at the
            final state past each length) and ``(B, H)`` state after the last real step.
        """
        batch, length = inputs.shape[0], inputs.shape[1]
        hidden_kernel = self.hidden_proj.kernel[...]
        hidden_bias = self.hidden_proj.bias[...]
        input_proj = jnp.swapaxes(self.input_proj(inputs), 0, 1)  # (L, B, 3H)
        mask = (jnp.arange(length)[:, None] < lengths[None, :])[..., None]  # (L, B, 1)
        if initial_state is None:
            initial_state = self.initial_state(batch, input_proj.dtype)

        def scan_step(state, xs):
            x_proj, valid = xs
            new_state = _gru_update(state, x_proj, hidden_kernel, hidden_bias)
            state = jnp.where(valid, new_state, state)
            return state, state

        final_state, outputs = jax.lax.scan(scan_step, initial_state, (input_proj, mask))
        return jnp.swapaxes(outputs, 0, 1), final_state


class GRUTextEncoder(nnx.Module):
    r"""Embeds padded captions: word embedding → GRU → last real state → L2 norm.

    .. math::

        v = \mathrm{normalize}\big(h_{\ell}\big), \qquad
        h_t = \mathrm{GRU}(E\,w_t, h_{t-1}),\ h_0 = 0

    where ``ℓ`` is the caption's length, as the reference ``EncoderText`` (embedding
    ``U(-0.1, 0.1)``, GRU state size = ``embed_size``). Stacked layers
    (``num_layers > 1``) feed each layer's states to the next, as ``nn.GRU``.

    Tokens are ``(B, L)`` integer ids padded with anything (0 by convention) after each
    caption's ``lengths[b]`` real tokens; the result does not depend on the padding.
    Outside ``jit``, lengths outside ``[1, L]`` and ids outside the vocabulary raise a
    ``ValueError``; inside ``jit`` (values unknown) a caption with an invalid length gets a
    NaN embedding, so the error shows in the loss instead of passing silently.

    Args:
        vocab_size: number of token ids.
        word_dim: size of the word embeddings (300 in the reference).
        embed_size: size of the joint embedding and of the GRU state.
        num_layers: number of stacked GRU layers.
        use_abs: take ``abs`` of the output (order embeddings).
        rngs: random streams for the initialisation.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> enc = GRUTextEncoder(10, 8, 4, rngs=nnx.Rngs(0))
        >>> enc(jnp.array([[3, 4, 0], [5, 6, 7]]), jnp.array([2, 3])).shape
        (2, 4)
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_size: int,
        *,
        num_layers: int = 1,
        use_abs: bool = False,
        rngs: nnx.Rngs,
    ):
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be at least 1, got {num_layers}.")
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.embed_size = embed_size
        self.num_layers = num_layers
        self.use_abs = use_abs
        self.embed = nnx.Embed(
            vocab_size, word_dim, embedding_init=symmetric_uniform(0.1), rngs=rngs
        )
        self.layers = nnx.List(
            [
                GRU(word_dim if i == 0 else embed_size, embed_size, rngs=rngs)
                for i in range(num_layers)
            ]
        )

    def __call__(self, tokens, lengths):
        """Maps ``(B, L)`` token ids and ``(B,)`` lengths to ``(B, embed_size)`` embeddings."""
        check_tokens_and_lengths(tokens, lengths, vocab_size=self.vocab_size)
        tokens = jnp.asarray(tokens)
        lengths = jnp.asarray(lengths)
        x = self.embed(tokens)
        final_state = None
        for layer in self.layers:
            x, final_state = layer(x, lengths)
        emb = l2_normalize(final_state)
        if self.use_abs:
            emb = jnp.abs(emb)
        if not is_concrete(lengths):
            valid = (lengths >= 1) & (lengths <= tokens.shape[1])
            emb = jnp.where(valid[:, None], emb, jnp.nan)
        return emb
