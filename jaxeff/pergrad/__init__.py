"""Per-example gradients and their statistics at about the cost of one backward pass.

* :func:`per_example_grads` -- reference ``vmap(grad)`` per-example gradients, in chunks
  (built on ``optax.microbatching.micro_grad``).
* :func:`per_example_stats` -- per-example squared norms, per-coordinate sums of squares
  and inner products with rank-1 directions for unmodified flax nnx models, from each
  ``nnx.Linear``/``nnx.Conv`` layer's inputs and backprop signals; other parameters take
  the vmap path, and :class:`PerExampleStats` says which path each parameter took.
* :func:`value_grad_and_stats` -- the weighted batch loss ``Σ_i w_i ℓ_i``, its gradient
  and the same statistics from one forward/backward pass (for a training step).
* :func:`direction_shapes` -- the ``(d_in, d_out)`` of each layer's rank-1 directions;
  :func:`check_directions` -- directions checked against a model's layers.
* :func:`layer_stats`, :func:`conv_patches` -- the Dense/Conv contractions themselves.
"""

from jaxeff.pergrad.capture import direction_shapes
from jaxeff.pergrad.reference import per_example_grads
from jaxeff.pergrad.rules import conv_patches, layer_stats
from jaxeff.pergrad.stats import (
    FAST,
    VMAP,
    PerExampleStats,
    check_directions,
    per_example_stats,
    value_grad_and_stats,
)

__all__ = [
    "FAST",
    "VMAP",
    "PerExampleStats",
    "check_directions",
    "conv_patches",
    "direction_shapes",
    "layer_stats",
    "per_example_grads",
    "per_example_stats",
    "value_grad_and_stats",
]
