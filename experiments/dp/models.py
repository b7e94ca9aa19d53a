"""The models of the DP-SGD experiment: an MLP and a small CNN, flax linen.

Both take float images ``(B, H, W, C)`` in ``[0, 1]`` and return ``(B, K)`` logits, with no
batch statistics or dropout: example ``i``'s loss depends on example ``i`` alone, as
per-example clipping needs (:func:`jaxeff.privacy.clipped_grad` checks it). Linen modules
are frozen dataclasses, hashable by their fields, so the jitted step takes the module as a
static argument and compiles once per architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import linen as nn

__all__ = ["ACTIVATIONS", "CNN", "MLP"]

#: Hidden-layer nonlinearities by config name.
ACTIVATIONS = {"tanh": jax.nn.tanh, "relu": jax.nn.relu}


class MLP(nn.Module):
    """Flattened pixels, ``len(hidden)`` dense layers with ``activation``, a linear head."""

    hidden: Sequence[int]
    num_classes: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Stages of a 3x3 convolution, ``activation`` and 2x2 average pooling, then a dense
    layer with ``activation`` and a linear head.

    ``H`` and ``W`` must be divisible by ``2**len(features)``.
    """

    features: Sequence[int]
    dense: int
    num_classes: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for width in self.features:
            x = act(nn.Conv(width, (3, 3), padding="SAME")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = act(nn.Dense(self.dense)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)
