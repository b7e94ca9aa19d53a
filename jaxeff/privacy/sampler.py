r"""Host-side Poisson sampling for DP-SGD, as a grain sampler.

The privacy accountants of DP-SGD (the moments / RDP accountant of Abadi et al.; Mironov,
Talwar, Zhang) assume Poisson subsampling: at every step ``t`` each of the ``N`` examples
is in the batch independently with probability ``q`` (the sampling rate),

.. math::

   P(S_t = S) = q^{|S|} (1 - q)^{N - |S|}, \qquad |S_t| \sim \mathrm{Binomial}(N, q),
   \qquad \mathbb{E}|S_t| = qN, \quad \mathrm{Var}|S_t| = qN(1 - q),

and the noisy gradient is ``(Σ_{i∈S_t} clip(g_i) + N(0, σ²C²I)) / (qN)``.
:class:`PoissonSampler` draws ``S_t`` as a pure function of ``(seed, t)``: the count
``K_t ~ Binomial(N, q)``, then a uniformly random ``K_t``-subset of the examples in a
uniformly random order. Given its size, the set of independent inclusions is uniform over
the subsets of that size, so this is exactly independent inclusion, at ``O(K_t)`` per step
instead of ``O(N)``. The draw does not depend on the batch size.

A jit needs one shape, so the batch has a fixed size ``b``: the first ``min(K_t, b)``
slots hold the drawn examples (in the random order, so each process of a multi-host run
gets a random share) with weight 1, the others are padding: example index 0 (a valid
record, so a reader can load it) with weight 0. A DP step masks it with
``is_padding = batch["weights"] == 0``; :func:`jaxeff.clustering.weighted_batches` reads
the batches unchanged.

Overflow: when ``K_t > b`` only the first ``b`` drawn examples are kept, a uniformly
random ``b``-subset of ``S_t``. That departs from the Poisson assumption (the accountant's
guarantee no longer holds exactly for that step), so choose ``b`` with
:func:`padded_batch_size` so that it is rare, and watch :meth:`PoissonSampler.overflow`
(examples dropped at a step) and :attr:`PoissonSampler.overflowed` (dropped over all steps
before :attr:`~PoissonSampler.next_step`, kept in the checkpointed state).

Everything else (kept drawn batches, ``batch`` as this process's rows of ``global_batch``
with ``shard_options``, grain's ``Sampler`` interface, ``get_state``/``set_state`` through
orbax) is as for :class:`jaxeff.clustering.StratifiedSampler`.

References:
  Abadi et al., "Deep Learning with Differential Privacy", https://arxiv.org/abs/1607.00133.
  Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
  https://arxiv.org/abs/1908.10530.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from jaxeff._checks import check_number
from jaxeff._extras import require
from jaxeff.clustering.samplers import (
    _BatchStream,
    _check_positive_int,
    _state_array,
)
from jaxeff.gvar import Sample

if TYPE_CHECKING:
    import grain
else:
    grain = require("grain", extra="privacy", feature="jaxeff.privacy.PoissonSampler")

__all__ = ["PoissonSampler", "padded_batch_size"]

_NO_SHARDING = grain.sharding.NoSharding()


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"`step` must be a non-negative int, got {step!r}.")
    return int(step)


def padded_batch_size(
    num_examples: int,
    sampling_rate: float,
    overflow_probability: float = 1e-6,
    *,
    multiple: int = 1,
) -> int:
    r"""The smallest batch size ``b`` with ``P(Binomial(N, q) > b) <= overflow_probability``.

    Rounded up to a multiple of ``multiple`` (e.g. the process or device count, which the
    batch size must be divisible by); at least ``multiple``. The tail probability is
    ``scipy.stats.binom.sf``, searched by bisection over ``b in [0, N]`` (it is
    non-increasing in ``b`` and ``0`` at ``b = N``).

    Args:
      num_examples: ``N``.
      sampling_rate: ``q`` in ``(0, 1]``.
      overflow_probability: the per-step probability of drawing more than ``b`` examples,
        in ``(0, 1)``. Over ``T`` steps some step overflows with probability at most
        ``T`` times this.
      multiple: a positive int the result is a multiple of.

    Returns:
      ``b`` as an int.

    Example::

      b = padded_batch_size(len(source), 256 / len(source), 1e-9, multiple=8)
    """
    size = _check_positive_int(num_examples, "num_examples")
    rate = float(check_number(sampling_rate, "sampling_rate", above=0.0, at_most=1.0, static=True))
    p = float(
        check_number(
            overflow_probability, "overflow_probability", above=0.0, below=1.0, static=True
        )
    )
    multiple = _check_positive_int(multiple, "multiple")
    low, high = 0, size  # sf(high) = 0 <= p; find the smallest b with sf(b) <= p
    while low < high:
        mid = (low + high) // 2
        if stats.binom.sf(mid, size, rate) <= p:
            high = mid
        else:
            low = mid + 1
    return max(1, math.ceil(low / multiple)) * multiple


class PoissonSampler(_BatchStream):
    r"""Poisson-subsampled, fixed-shape batches for DP-SGD, for a grain input pipeline.

    Step ``t`` includes each example independently with probability ``q``: it draws
    ``K_t ~ Binomial(N, q)`` from ``numpy.random.default_rng([seed, t])``, then a
    uniformly random ordered ``K_t``-subset (:meth:`drawn_examples`). The global batch
    (:meth:`global_batch`) is ``Sample(indices, weights)`` of ``b`` slots: the first
    ``min(K_t, b)`` drawn examples with weight 1.0, then padding slots with index 0 and
    weight 0.0. When ``K_t > b``, the ``K_t - b`` examples beyond the batch are dropped (a
    uniformly random ``b``-subset is kept: no longer Poisson sampling for that step) and
    counted in :meth:`overflow` and :attr:`overflowed`; pick ``b`` with
    :func:`padded_batch_size`.

    The DP step sums the clipped per-example gradients of the weight-1 slots and divides
    by the expected batch size :attr:`expected_batch_size` ``= qN`` (not by ``K_t``, which
    would leak the batch size).

    Args:
      num_examples: ``N``.
      sampling_rate: ``q`` in ``(0, 1]``.
      batch_size: ``b``, the fixed global batch size; divisible by the shard count.
      seed: a 32-bit int.
      shard_options: this process's shard (``grain.sharding.ShardOptions``); with
        ``ShardOptions(p, P)``, :meth:`batch` is rows ``[p b/P, (p+1) b/P)`` of the
        global batch. The drawn slots come first, so the last processes hold most of the
        padding (the same shapes, so the same compute).

    Example::

      q = 256 / len(source)
      sampler = PoissonSampler(len(source), q, padded_batch_size(len(source), q, 1e-9))
      for batch in weighted_batches(source, sampler):
        is_padding = batch["weights"] == 0
        ...                    # clip, sum the non-padding gradients, add noise, / (q N)
      assert sampler.overflowed == 0
    """

    def __init__(
        self,
        num_examples: int,
        sampling_rate: float,
        batch_size: int,
        *,
        seed: int = 0,
        shard_options: grain.sharding.ShardOptions = _NO_SHARDING,
    ):
        super().__init__(num_examples, batch_size, seed, shard_options)
        self.sampling_rate = float(
            check_number(sampling_rate, "sampling_rate", above=0.0, at_most=1.0, static=True)
        )
        self._overflowed = 0

    def __repr__(self) -> str:
        return (
            f"PoissonSampler(num_examples={self.num_examples}, sampling_rate="
            f"{self.sampling_rate!r}, batch_size={self.batch_size}, seed={self.seed}, "
            f"shard_options={self._shard_options!r})"
        )

    @property
    def expected_batch_size(self) -> float:
        """``qN``, the mean number of examples drawn per step (the DP-SGD denominator)."""
        return self.sampling_rate * self.num_examples

    # -- the Poisson draw -------------------------------------------------------------
    def _count(self, rng: np.random.Generator) -> int:
        return int(rng.binomial(self.num_examples, self.sampling_rate))

    def _poisson(self, rng: np.random.Generator) -> np.ndarray:
        """A uniformly random ordered subset of Binomial(N, q) size: independent inclusion."""
        count = self._count(rng)
        return rng.choice(self.num_examples, count, replace=False, shuffle=True)

    def _draw(self, rng):
        drawn = self._poisson(rng)[: self.batch_size]
        indices = np.zeros(self.batch_size, np.int64)  # padding: example 0, weight 0
        weights = np.zeros(self.batch_size, np.float32)
        indices[: len(drawn)] = drawn
        weights[: len(drawn)] = 1.0
        return indices, weights

    def num_drawn(self, step: int) -> int:
        """``K_t``, how many examples Poisson sampling drew at ``step`` (before truncation)."""
        step = _check_step(step)
        return self._count(np.random.default_rng([self.seed, step]))

    def drawn_examples(self, step: int) -> np.ndarray:
        """All ``K_t`` examples drawn at ``step``, int32, in the batch's order.

        The batch's weight-1 slots are the first ``min(K_t, b)`` of them; the rest are
        those :meth:`overflow` counts. Redrawn on each call (``O(K_t)``), not kept.
        """
        step = _check_step(step)
        return self._poisson(np.random.default_rng([self.seed, step])).astype(np.int32)

    def overflow(self, step: int) -> int:
        """``max(0, K_t - b)``: the drawn examples dropped from the batch of ``step``.

        A pure function of the seed and ``step`` (``O(1)``), drawn or not.
        """
        return max(0, self.num_drawn(step) - self.batch_size)

    @property
    def overflowed(self) -> int:
        """The examples dropped over all steps before :attr:`next_step` (``Σ overflow``)."""
        return self._overflowed

    def global_batch(self, step: int) -> Sample:
        """The whole ``b``-slot batch of ``step``; advances :attr:`overflowed` as well.

        Drawing a step ``J`` beyond :attr:`next_step` counts the overflow of the skipped
        steps too (``J`` binomial draws).
        """
        with self._lock:
            frontier = self._next_step
            sample = super().global_batch(step)
            for skipped_or_new in range(frontier, self._next_step):
                self._overflowed += self.overflow(skipped_or_new)
            return sample

    # -- state ----------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """``{"seed", "step", "num_examples", "sampling_rate", "batch_size", "overflowed"}``.

        Numpy scalars (checkpoint with orbax bit for bit, e.g. through
        :class:`jaxeff.train.Checkpointer`); future batches depend on the seed and
        ``step`` alone, the rest identifies the sampler and carries the overflow total.
        """
        with self._lock:
            return {
                **self._base_state(),
                "num_examples": np.asarray(self.num_examples, np.int64),
                "sampling_rate": np.asarray(self.sampling_rate, np.float64),
                "batch_size": np.asarray(self.batch_size, np.int64),
                "overflowed": np.asarray(self._overflowed, np.int64),
            }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`get_state`'s dict (numpy or JAX arrays, e.g. from orbax).

        Raises:
          ValueError: if ``state`` is from a sampler with another seed, ``num_examples``,
            ``sampling_rate`` or ``batch_size``, or is malformed.
        """
        for key, mine in (
            ("num_examples", self.num_examples),
            ("batch_size", self.batch_size),
        ):
            saved = int(_state_array(state, key, (), np.int64))
            if saved != mine:
                raise ValueError(
                    f"`state` was saved by a sampler with {key}={saved}; this one has {mine}."
                )
        rate = float(_state_array(state, "sampling_rate", (), np.float64))
        if rate != self.sampling_rate:
            raise ValueError(
                f"`state` was saved by a sampler with sampling_rate={rate!r}; this one has "
                f"{self.sampling_rate!r}."
            )
        overflowed = int(_state_array(state, "overflowed", (), np.int64))
        if overflowed < 0:
            raise ValueError(f"`state['overflowed']` must be non-negative, got {overflowed}.")
        with self._lock:
            self._set_base_state(state)
            self._overflowed = overflowed
