"""Schedules for the hard-negative weight of :func:`jaxeff.losses.hinge_loss`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # annotations only: the losses import neither at run time
    import chex
    import optax


def hard_negative_schedule(warmup_steps: int, transition_steps: int = 0) -> optax.Schedule:
    """Weight ``w(step)`` moving the loss from SH (``w=0``) to MH (``w=1``).

    MH trained from scratch can collapse (all embeddings equal, loss ``2·B·α``); training
    first with the sum of hinges and then switching to the max of hinges avoids it (later
    VSE work warms up with SH for one epoch). The weight is 0 for ``warmup_steps`` steps,
    then rises linearly to 1 over ``transition_steps`` (a hard switch when 0):

    .. math:: w(t) = \\mathrm{clip}\\big((t - t_0 + 1) / (t_1 + 1), 0, 1\\big)

    with ``t_0 = warmup_steps`` and ``t_1 = transition_steps``. Pass ``w`` as
    ``max_violation`` to the loss; as a traced value it never recompiles the step.

    Args:
      warmup_steps: steps of pure SH.
      transition_steps: steps of the linear blend from SH to MH.

    Returns:
      An optax-style schedule: ``step -> weight`` (float32 scalar in ``[0, 1]``).
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be a non-negative int, got {warmup_steps!r}.")
    if (
        isinstance(transition_steps, bool)
        or not isinstance(transition_steps, int)
        or transition_steps < 0
    ):
        raise ValueError(
            f"`transition_steps` must be a non-negative int, got {transition_steps!r}."
        )

    def schedule(step: chex.Numeric) -> jax.Array:
        t = jnp.asarray(step, jnp.float32) - warmup_steps + 1
        return jnp.clip(t / (transition_steps + 1), 0.0, 1.0)

    return schedule
