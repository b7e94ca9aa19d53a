"""Preemption: a SIGTERM becomes "save a checkpoint at this step and exit cleanly".

Schedulers (Kubernetes, Slurm, cloud TPU/GPU maintenance) send SIGTERM some seconds
before they kill a job. On one process, :class:`PreemptionSignal` records the signal
instead of dying, and the loop asks it after each step; on many processes JAX's
preemption service (started by ``jax.distributed.initialize``) receives the signal and
orbax's sync point makes every process stop at the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Self

import jax

if TYPE_CHECKING:
    from jaxeff.train.checkpoint import Checkpointer

__all__ = ["PreemptionSignal"]


class PreemptionSignal:
    """Catches SIGTERM while active; ``signal(step)`` says whether to save and stop.

    Args:
      checkpointer: optional :class:`jaxeff.train.Checkpointer`; on several processes its
        ``reached_preemption(step)`` (a sync point all processes reach together) decides.
      signals: the signals to catch on a single process.

    Use as a context manager around the training loop; the previous handlers come back on
    exit. Outside the main thread (where Python cannot install handlers) only the
    multi-process path works.

    Example::

      with PreemptionSignal(ckpt) as preempted:
        for step in range(start, num_steps):
          state, metrics = train_step(state, batch)
          if preempted(step + 1):
            ckpt.save(step + 1, state)
            break
    """

    def __init__(
        self,
        checkpointer: Checkpointer | None = None,
        *,
        signals: Iterable[int] = (signal.SIGTERM,),
    ):
        self._checkpointer = checkpointer
        self._signals = tuple(signals)
        self._previous: dict[
            int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
        ] = {}
        self.received: int | None = None  # the signal number, once caught

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> Self:
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def __call__(self, step: int) -> bool:
        """True once preemption was signalled (checked once per step, on every process)."""
        if jax.process_count() > 1 and self._checkpointer is not None:
            return bool(self._checkpointer.reached_preemption(step))
        return self.received is not None
