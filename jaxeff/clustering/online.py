r"""Online gradient clustering: moving averages of sizes and centres, one batch at a time.

Each training batch is assigned with the current centres (the statistics the training
step computes anyway, with ``directions=state.centres``), and with decay ``β``:

.. math::

   N_k' = \beta N_k + (1-\beta)\, n_k, \qquad
   f_{k,j}' = \frac{\beta N_k f_{k,j} + (1-\beta) F_{k,j}}{\beta N_k + (1-\beta) n_k}

for every factor ``f_{k,j}`` of every centre: the size-weighted blend of the old centre and
the batch's members (``n_k``, ``F_{k,j}`` from :func:`jaxeff.clustering.cluster_sums`; sizes
count examples per batch).
Every ``reinit_every`` updates, clusters below ``min_fraction`` of the total size are
re-seeded at the farthest member of the batch's highest-distortion cluster
(:func:`jaxeff.clustering.split_small_clusters`). Faghri, Duvenaud, Fleet, Ba, "A Study of
Gradient Variance in Deep Learning", https://arxiv.org/abs/2007.04532.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxeff._checks import check_number
from jaxeff.clustering.centres import ClusterState, assign_members
from jaxeff.clustering.sums import (
    ClusterSums,
    check_min_fraction,
    member_sums,
    split_small_clusters,
)
from jaxeff.pergrad import PerExampleStats

__all__ = ["apply_sums", "check_online_options", "online_update"]


def check_online_options(*, decay: Any, min_fraction: Any, reinit_every: Any) -> None:
    """The checks of :func:`online_update`'s options, naming the argument.

    ``decay`` and ``min_fraction`` must lie in ``[0, 1)`` (traced values pass unchecked);
    ``reinit_every`` is a Python int ``>= 0``.
    """
    check_number(decay, "decay", at_least=0, below=1)
    check_min_fraction(min_fraction)
    if isinstance(reinit_every, bool) or not isinstance(reinit_every, int) or reinit_every < 0:
        raise ValueError(f"`reinit_every` must be a non-negative integer, got {reinit_every!r}.")


def online_update(
    state: ClusterState,
    stats: PerExampleStats,
    *,
    decay: float = 0.9,
    min_fraction: float = 0.0,
    reinit_every: int = 0,
    size_weighted: bool = True,
    mask: ArrayLike | None = None,
) -> tuple[ClusterState, jax.Array]:
    """One online update from a batch's per-example statistics (module docstring).

    Args:
      state: the current :class:`ClusterState`.
      stats: :class:`jaxeff.pergrad.PerExampleStats` of the batch, computed with
        ``directions=state.centres``.
      decay: ``β`` in ``[0, 1)``; 0 replaces each centre by its batch members' mean.
      min_fraction: clusters smaller than this fraction of ``Σ_k N_k`` are re-seeded ...
      reinit_every: ... every this many updates (0: never).
      size_weighted: assign by ``argmin_k (N_k + 1) d_{ik}`` (``False``: nearest centre).
      mask: optional ``(B,)`` bool, false for rows that are not real examples.

    Returns:
      ``(new_state, assignments)``, ``assignments`` the ``(B,)`` clusters of the batch
      under ``state`` (the ones its sums were added to).
    """
    check_online_options(decay=decay, min_fraction=min_fraction, reinit_every=reinit_every)
    assignments, members, dist = assign_members(
        state, stats, size_weighted=size_weighted, mask=mask
    )
    sums = member_sums(state, stats, members, dist)
    new = apply_sums(state, sums, decay=decay, min_fraction=min_fraction, reinit_every=reinit_every)
    return new, assignments


def apply_sums(
    state: ClusterState,
    sums: ClusterSums,
    *,
    decay: float,
    min_fraction: float,
    reinit_every: int,
) -> ClusterState:
    """The clusters after the moving averages with one batch's sums (module docstring),
    and every ``reinit_every`` updates the split of small clusters."""
    old = decay * state.sizes
    new = (1.0 - decay) * sums.counts
    total = old + new
    positive = total > 0
    safe = jnp.where(positive, total, 1.0)

    def blend(centre, batch_sum):
        shape = (-1, *[1] * (centre.ndim - 1))
        mixed = (old.reshape(shape) * centre + (1.0 - decay) * batch_sum) / safe.reshape(shape)
        return jnp.where(positive.reshape(shape), mixed, centre)

    centres = jax.tree.map(blend, state.centres, sums.factor_sums)
    count = state.count + 1
    if reinit_every:
        split_centres, split_sizes = split_small_clusters(
            centres, total, sums, min_fraction=min_fraction
        )
        due = count % reinit_every == 0
        centres = jax.tree.map(lambda a, b: jnp.where(due, a, b), split_centres, centres)
        total = jnp.where(due, split_sizes, total)
    return ClusterState(centres, total, count)
