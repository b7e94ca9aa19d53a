"""Networks whose end-to-end function is linear, and the linear classifier each one equals.

A deep linear network and a linear circular-convolution network are linear in their
input, ``f(x) = <w, x> + b``, however many layers they have; their parameterisation only
changes which ``w`` gradient descent finds (Gunasekar et al., 2018). Each model's
``linear_classifier()`` returns that ``(w, b)``, so the exact closed forms of
:mod:`jaxeff.robust.linear` (robust accuracy, worst-case perturbations, certified radii)
apply to the trained network: fully connected ones converge toward the L2 max-margin
classifier, circular-convolution ones toward the Fourier-L1 one, which is robust to
Fourier-L∞ perturbations (Faghri et al., 2021).

Binary models output one score per example, shape ``(B,)``, to be read with labels
``±1``; ``num_classes = K`` gives ``(B, K)`` logits. ``w`` has the example's shape
(binary) or the example's shape plus ``(K,)``, as :func:`jaxeff.robust.robust_accuracy`
expects.

Gunasekar, Lee, Soudry, Srebro, `Implicit Bias of Gradient Descent on Linear Convolutional
Networks <https://arxiv.org/abs/1806.00468>`_, NeurIPS 2018; Faghri et al., `Bridging the
Gap Between Adversarial Robustness and Optimization Bias
<https://arxiv.org/abs/2102.08868>`_, 2021.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DeepLinear", "LinearClassifier", "LinearConvNet"]


class LinearClassifier(NamedTuple):
    """The affine function ``x -> <w, x> + b`` a linear network computes.

    Attributes:
      w: weights of shape ``S`` (one example's shape; binary) or ``S + (K,)``.
      b: bias, a scalar (binary) or ``(K,)``.
    """

    w: jax.Array
    b: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        """Scores ``(B,)`` or logits ``(B, K)`` of the ``(B, *S)`` inputs ``x``."""
        example_ndim = self.w.ndim - (self.b.ndim == 1)
        return jnp.tensordot(jnp.asarray(x), self.w, axes=example_ndim) + self.b


def _check_shape(shape, name):
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
    if not shape or any(
        isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in shape
    ):
        raise ValueError(f"`{name}` must be a positive int or a tuple of them, got {shape!r}.")
    return tuple(int(n) for n in shape)


def _check_num_classes(num_classes):
    if num_classes is None:
        return 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(
            f"`num_classes` must be None (binary) or an int >= 2, got {num_classes!r}."
        )
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be None (binary) or an int >= 2, got {num_classes}.")
    return int(num_classes)


def _check_input(x, in_shape):
    if jnp.ndim(x) < 1 or jnp.shape(x)[1:] != in_shape:
        raise ValueError(
            f"`x` must have shape (B, {', '.join(map(str, in_shape))}), got {jnp.shape(x)}."
        )


def _readout_output(out, binary):
    return out[:, 0] if binary else out


class DeepLinear(nnx.Module):
    """A stack of ``nnx.Linear`` layers without activations: an affine map of any depth.

    .. math::

      f(x) = (\\cdots((x K_1 + b_1) K_2 + b_2) \\cdots) K_L + b_L = x\\, w + b,\\qquad
      w = K_1 K_2 \\cdots K_L,\\quad b = (\\cdots(b_1 K_2 + b_2)\\cdots) K_L + b_L

    The input is flattened, so an example may have any shape (images included).

    Args:
      in_shape: shape of one example (an int for vectors).
      widths: sizes of the hidden layers (empty: a single linear layer).
      num_classes: None for one score per example (binary, labels ``±1``), else ``K >= 2``
        logits.
      use_bias: whether every layer has a bias.
      kernel_init: initialiser of every kernel (flax's default if None).
      rngs: random streams for the initialisation.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = DeepLinear(4, (8, 8), rngs=nnx.Rngs(0))
      >>> clf = model.linear_classifier()
      >>> x = jnp.ones((2, 4))
      >>> clf.w.shape, bool(jnp.allclose(model(x), clf(x), atol=1e-5))
      ((4,), True)
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        widths: Sequence[int] = (),
        *,
        num_classes: int | None = None,
        use_bias: bool = True,
        kernel_init: jax.nn.initializers.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_shape = _check_shape(in_shape, "in_shape")
        widths = tuple(widths)
        if widths:
            _check_shape(widths, "widths")
        self.widths = tuple(int(n) for n in widths)
        self.num_classes = num_classes
        outputs = _check_num_classes(num_classes)
        sizes = (math.prod(self.in_shape), *self.widths, outputs)
        extra: dict[str, Any] = {} if kernel_init is None else {"kernel_init": kernel_init}
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=use_bias, rngs=rngs, **extra)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(x, self.in_shape)
        h = jnp.reshape(x, (jnp.shape(x)[0], -1))
        for layer in self.layers:
            h = layer(h)
        return _readout_output(h, self.num_classes is None)

    def linear_classifier(self) -> LinearClassifier:
        """The ``(w, b)`` with ``model(x) == <w, x> + b``: the product of the kernels and the
        bias pushed through the later layers."""
        w = None
        b = None
        for layer in self.layers:
            kernel = layer.kernel[...]
            w = kernel if w is None else w @ kernel
            b = None if b is None else b @ kernel
            if layer.bias is not None:
                bias = layer.bias[...]
                b = bias if b is None else b + bias
        assert w is not None  # there is at least one layer
        if b is None:
            b = jnp.zeros(w.shape[1], w.dtype)
        if self.num_classes is None:
            return LinearClassifier(w[:, 0].reshape(self.in_shape), b[0])
        return LinearClassifier(w.reshape(self.in_shape + (self.num_classes,)), b)


def _spatial_and_channels(in_shape):
    """``(spatial shape, channels)``: ``(d,)`` and ``(H, W)`` have one channel."""
    if len(in_shape) == 1:
        return in_shape, 1
    if len(in_shape) == 2:
        return in_shape, 1
    if len(in_shape) == 3:
        return in_shape[:2], in_shape[2]
    raise ValueError(
        f"`in_shape` must be (d,) for 1-D signals, (H, W) or (H, W, C) for images, got {in_shape}."
    )


class LinearConvNet(nnx.Module):
    """Circular convolutions without activations, then a linear readout: a linear model.

    Layer ``l`` is an ``nnx.Conv`` with ``padding="CIRCULAR"`` and stride 1 from
    ``channels[l-1]`` to ``channels[l]`` channels, so it is a circular convolution: it
    commutes with cyclic shifts and is diagonal in the Fourier domain, with one
    ``(c_out, c_in)`` matrix per frequency,

    .. math::

      \\widehat{A_l x}(f) = M_l(f)\\, \\hat x(f),\\qquad M_l(f) = \\mathrm{DFT}(h_l)(f),

    ``h_l`` the layer's response to a unit impulse at the origin. The network's linear part
    is ``M(f) = M_L(f) \\cdots M_1(f)``; with readout weights ``r`` the equivalent weights
    are ``w = Aᵀ r``, i.e. ``\\hat w(f) = M(f)^H \\hat r(f)``, and each layer's bias (constant
    over positions) passes through the later layers by their zero-frequency multipliers.
    :meth:`linear_classifier` computes exactly this.

    Signals follow the convention of :mod:`jaxeff.robust.fourier`: an example ``(d,)`` is
    a 1-D signal, ``(H, W)`` a one-channel image, ``(H, W, C)`` an image with ``C``
    channels (2-D convolutions over ``(H, W)``). Kernels span the whole signal by default
    (``kernel_size = (d,)`` or ``(H, W)``), the full-width convolutions of Gunasekar et al.

    Args:
      in_shape: shape of one example: ``(d,)``, ``(H, W)`` or ``(H, W, C)``.
      channels: output channels of each convolution (``(1, 1)``: two single-channel
        layers); its length is the depth.
      kernel_size: spatial size of every kernel (an int or a tuple, at most the signal's
        size; None: the whole signal).
      num_classes: None for one score per example (binary), else ``K >= 2`` logits.
      use_bias: whether the convolutions and the readout have biases.
      rngs: random streams for the initialisation.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = LinearConvNet((8,), (1, 1, 1), rngs=nnx.Rngs(0))
      >>> clf = model.linear_classifier()
      >>> x = jnp.ones((2, 8))
      >>> clf.w.shape, bool(jnp.allclose(model(x), clf(x), atol=1e-5))
      ((8,), True)
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        channels: Sequence[int] = (1,),
        *,
        kernel_size: int | Sequence[int] | None = None,
        num_classes: int | None = None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        self.in_shape = _check_shape(in_shape, "in_shape")
        spatial, in_channels = _spatial_and_channels(self.in_shape)
        self.channels = _check_shape(channels, "channels")
        if kernel_size is None:
            kernel = spatial
        else:
            kernel = _check_shape(kernel_size, "kernel_size")
            kernel = kernel * len(spatial) if len(kernel) == 1 else kernel
            if len(kernel) != len(spatial) or any(
                k > n for k, n in zip(kernel, spatial, strict=True)
            ):
                raise ValueError(
                    f"`kernel_size` must have {len(spatial)} entries, each at most the signal "
                    f"size {spatial}, got {kernel_size!r}."
                )
        self.spatial = spatial
        self.in_channels = in_channels
        self.kernel_size = kernel
        self.num_classes = num_classes
        outputs = _check_num_classes(num_classes)
        sizes = (in_channels, *self.channels)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel, padding="CIRCULAR", use_bias=use_bias, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.readout = nnx.Linear(
            math.prod(spatial) * self.channels[-1], outputs, use_bias=use_bias, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(x, self.in_shape)
        h = jnp.reshape(x, (jnp.shape(x)[0], *self.spatial, self.in_channels))
        for conv in self.convs:
            h = conv(h)
        out = self.readout(h.reshape(h.shape[0], -1))
        return _readout_output(out, self.num_classes is None)

    def multipliers(self) -> list[jax.Array]:
        """Each convolution's DFT multipliers ``M_l(f)``: complex, ``spatial + (c_out, c_in)``.

        Computed from the layer's response to a unit impulse at the origin of each input
        channel (so no convention of the padding's offset is assumed).
        """
        axes = tuple(range(len(self.spatial)))
        out = []
        for conv in self.convs:
            c_in = conv.in_features
            origin = (0,) * len(self.spatial)
            impulses = jnp.zeros((c_in, *self.spatial, c_in))
            impulses = impulses.at[(jnp.arange(c_in), *origin, jnp.arange(c_in))].set(1.0)
            response = conv(impulses) - conv(jnp.zeros_like(impulses))
            h = jnp.moveaxis(response, 0, -1)  # spatial + (c_out, c_in)
            out.append(jnp.fft.fftn(h, axes=axes))
        return out

    def linear_classifier(self) -> LinearClassifier:
        """The ``(w, b)`` with ``model(x) == <w, x> + b``, from the product of the layers'
        DFT multipliers (see the class docstring)."""
        axes = tuple(range(len(self.spatial)))
        multiplier = None
        bias = jnp.zeros(self.in_channels)
        for conv, m in zip(self.convs, self.multipliers(), strict=True):
            multiplier = m if multiplier is None else m @ multiplier
            dc = jnp.real(m[(0,) * len(self.spatial)])  # (c_out, c_in)
            bias = dc @ bias
            if conv.bias is not None:
                bias = bias + conv.bias[...]
        assert multiplier is not None  # there is at least one convolution
        outputs = self.readout.out_features
        r = self.readout.kernel[...].reshape(*self.spatial, self.channels[-1], outputs)
        r_hat = jnp.fft.fftn(r, axes=axes)
        w_hat = jnp.conj(jnp.swapaxes(multiplier, -1, -2)) @ r_hat  # spatial + (c_in, K)
        w = jnp.real(jnp.fft.ifftn(w_hat, axes=axes)).reshape(self.in_shape + (outputs,))
        b = jnp.einsum("...ck,c->k", r, bias)
        if self.readout.bias is not None:
            b = b + self.readout.bias[...]
        w = w.astype(self.readout.kernel.dtype)
        if self.num_classes is None:
            return LinearClassifier(w[..., 0], b[0])
        return LinearClassifier(w, b)
