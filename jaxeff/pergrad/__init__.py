"""Per-example gradient statistics of any JAX loss at about the cost of one backward pass.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning", 2020.

* :func:`per_example_stats` -- for ``loss_fn(params, batch) -> (B,)`` with ``params`` any
  pytree (flax linen, equinox, haiku, plain JAX, nnx after ``nnx.split``): per-example
  squared norms, per-coordinate sums of squares and inner products with factored
  directions, read from the loss's jaxpr (:mod:`~jaxeff.pergrad.engine`); a leaf used
  where no exact rule applies takes the ``vmap(grad)`` path alone, and
  :class:`PerExampleStats` says which path each leaf took and why.
* :func:`value_grad_and_stats` -- the weighted loss ``Σ_i w_i ℓ_i``, its gradient and the
  same statistics from one forward/backward pass (for a training step).
* :func:`direction_shapes` -- each leaf's cheap direction split; :func:`check_directions`.
* :mod:`jaxeff.pergrad.stats` -- the same for an ``nnx.Module`` and ``loss_fn(model, batch)``.
* :func:`per_example_grads` -- reference ``vmap(grad)`` per-example gradients, in chunks.
* :func:`layer_stats`, :func:`conv_patches` -- the outer-product contractions themselves.
"""

from jaxeff.pergrad.engine import (
    FAST,
    VMAP,
    PerExampleStats,
    check_directions,
    direction_shapes,
    param_paths,
    per_example_stats,
    value_grad_and_stats,
)
from jaxeff.pergrad.reference import per_example_grads
from jaxeff.pergrad.rules import conv_patches, layer_stats
from jaxeff.pergrad.tracing import CouplingError

__all__ = [
    "FAST",
    "VMAP",
    "CouplingError",
    "PerExampleStats",
    "check_directions",
    "conv_patches",
    "direction_shapes",
    "layer_stats",
    "param_paths",
    "per_example_grads",
    "per_example_stats",
    "value_grad_and_stats",
]
