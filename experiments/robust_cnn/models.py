"""The models of the Fourier-L∞ experiments: a small CNN and a linear classifier.

Both take float images ``(B, H, W, C)`` in ``[0, 1]`` (:func:`as_float` scales uint8
images) and return ``(B, K)`` logits. Neither has batch statistics or dropout, so the
examples of a batch never interact, as :func:`jaxeff.robust.pgd_attack` requires. The
linear model's weights have the layout of :mod:`jaxeff.robust.linear` (``W`` of shape
``(H, W, C, K)``, ``b`` of shape ``(K,)``), so its exact robust accuracy is known in closed
form and checks the attack.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["CNN", "LinearClassifier", "as_float"]


def as_float(images) -> np.ndarray:
    """uint8 images to float32 in ``[0, 1]``; float images as float32, unchanged."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


class CNN(nnx.Module):
    """Stages of a 3x3 convolution, ReLU and 2x2 max pooling, then a ReLU dense layer and
    a linear head.

    Args:
      image_shape: ``(H, W, C)``; ``H`` and ``W`` must be divisible by ``2**len(features)``.
      features: output channels of each stage's convolution.
      dense: width of the hidden dense layer.
      num_classes: ``K``.
      rngs: the initialisation's PRNG streams.
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
        scale = 2 ** len(features)
        if height % scale or width % scale:
            raise ValueError(
                f"config.model.features has {len(features)} pooling stages, which need an "
                f"image size divisible by {scale}; got {height}x{width}."
            )
        sizes = [channels, *features]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        flat = (height // scale) * (width // scale) * sizes[-1]
        self.dense = nnx.Linear(flat, dense, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def __call__(self, x):
        for conv in self.convs:
            x = nnx.max_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.head(x)


class LinearClassifier(nnx.Module):
    """``z_k = <W_k, x> + b_k``: multi-class logistic regression on the pixels.

    Initialised at zero (the logistic loss has a unique minimiser direction to find).

    Args:
      image_shape: ``(H, W, C)``.
      num_classes: ``K``.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int):
        self.w = nnx.Param(jnp.zeros((*image_shape, num_classes), jnp.float32))
        self.b = nnx.Param(jnp.zeros((num_classes,), jnp.float32))

    def __call__(self, x):
        return jnp.tensordot(x, self.w[...], axes=self.w.ndim - 1) + self.b[...]

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` as numpy arrays, the layout of :func:`jaxeff.robust.robust_accuracy`."""
        return np.asarray(self.w[...]), np.asarray(self.b[...])
