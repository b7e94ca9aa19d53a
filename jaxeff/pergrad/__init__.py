"""Per-example gradients and their statistics at about the cost of one backward pass.

* :func:`per_example_grads` -- reference ``vmap(grad)`` per-example gradients, in chunks
  (built on ``optax.microbatching.micro_grad``).
* :func:`per_example_stats` -- per-example squared norms, per-coordinate sums of squares
  and inner products with rank-1 directions for unmodified flax nnx models, from each
  ``nnx.Linear``/``nnx.Conv`` layer's inputs and backprop signals; other parameters take
  the vmap path, and :class:`PerExampleStats` says which path each parameter took.
* :func:`direction_shapes` -- the ``(d_in, d_out)`` of each layer's rank-1 directions.
* :func:`layer_stats`, :func:`conv_patches` -- the Dense/Conv contractions themselves.
"""

from jaxeff.pergrad.capture import direction_shapes
from jaxeff.pergrad.reference import per_example_grads
from jaxeff.pergrad.rules import conv_patches, layer_stats
from jaxeff.pergrad.stats import FAST, VMAP, PerExampleStats, per_example_stats

__all__ = [
    "FAST",
    "VMAP",
    "PerExampleStats",
    "conv_patches",
    "direction_shapes",
    "layer_stats",
    "per_example_grads",
    "per_example_stats",
]
