"""The models of the gradient-variance experiments: linear regression, an MLP and a CNN.

Built from unmodified ``nnx.Linear``/``nnx.Conv`` layers only, so that
:func:`jaxeff.pergrad.per_example_stats` takes its fast path for every parameter. Inputs
are float arrays, or uint8 images scaled to ``[0, 1]`` (:func:`as_float`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CNN", "MLP", "LinearRegression", "as_float"]


def as_float(x: jax.Array) -> jax.Array:
    """uint8 images to float32 in ``[0, 1]``; float inputs unchanged."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 255.0
    return x


class LinearRegression(nnx.Module):
    """``f(x) = wᵀx``, no bias, ``w`` initialised at zero (the study's noisy quadratic)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(
            dim, 1, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=rngs
        )

    def __call__(self, x):
        return self.linear(as_float(x))[:, 0]


class MLP(nnx.Module):
    """Flatten, ReLU hidden layers, linear head."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *, rngs):
        sizes = [in_features, *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = as_float(x).reshape(x.shape[0], -1)
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(x)


class CNN(nnx.Module):
    """5x5 convolutions with ReLU and 2x2 max pooling, then a ReLU dense layer and a head.

    The study's MNIST "cnn" with ``features=(32, 64)`` (its code used 10 and 20 channels
    and a dense layer of 50).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        features: Sequence[int],
        dense: int,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
    ):
        height, width, channels = image_shape
        sizes = [channels, *features]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(5, 5), padding="SAME", rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        for _ in features:
            height, width = height // 2, width // 2
        self.dense = nnx.Linear(height * width * sizes[-1], dense, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def __call__(self, x):
        x = as_float(x)
        for conv in self.convs:
            x = nnx.max_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(x)
