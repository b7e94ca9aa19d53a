"""Differentially private SGD for any JAX model: exact per-example clipping from the engine.

* :func:`clipped_grad` -- ``Σ_i min(1, C/‖g_i‖) g_i / n`` for ``loss_fn(params, batch) ->
  (B,)``, by book-keeping (one pass) or ghost clipping (two), all-layer or group-wise,
  with padding masks and non-finite examples left out and reported
  (:mod:`~jaxeff.privacy.clipping`). It is jax-privacy's ``BoundedSensitivityCallable``,
  so jax-privacy's noise mechanisms (``jax_privacy.noise_addition.gaussian_privatizer``,
  an optax transform) take its ``sensitivity()`` unchanged.
* :func:`dpsgd_epsilon` -- ``ε`` from dp-accounting's PLD or RDP accountant
  (:mod:`~jaxeff.privacy.accounting`).
* :class:`PoissonSampler` -- a checkpointable grain sampler that draws each example with
  probability ``q`` (the sampling the accountants assume), padded to a fixed batch with
  weight-0 slots, overflow reported; :func:`padded_batch_size` sizes the batch
  (:mod:`~jaxeff.privacy.sampler`).

An optax loop becomes DP-SGD by replacing ``jax.grad`` with :func:`clipped_grad` and
chaining the privatizer in front of the optimizer::

  grad_fn = clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=q * N)
  tx = optax.chain(gaussian_privatizer(stddev=sigma * grad_fn.sensitivity(),
                                       prng_key=jax.random.key(0)), optax.sgd(0.5))
"""

from jaxeff.privacy.accounting import dpsgd_epsilon, dpsgd_event
from jaxeff.privacy.clipping import ClipReport, clipped_grad
from jaxeff.privacy.sampler import PoissonSampler, padded_batch_size

__all__ = [
    "ClipReport",
    "PoissonSampler",
    "clipped_grad",
    "dpsgd_epsilon",
    "dpsgd_event",
    "padded_batch_size",
]
