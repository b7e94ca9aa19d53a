"""Checkpoints with orbax: the latest one (to resume after preemption) and the best ones.

Layout under ``directory``::

  <step>/state     the TrainState pytree (orbax StandardSave, sharded arrays)
  <step>/extra     a JSON dict: input-pipeline position, RNG seed, config, ...
  <step>/metrics   the evaluation metrics of the step, when it was evaluated

One checkpoint per step holds everything: whether a step is among the best is read from
its own ``metrics``, so "latest" and "best" are never two writes that a kill can
separate. Old steps are deleted only after a newer one is committed, and only when they
are neither among the ``keep_latest`` most recent nor among the ``keep_best`` best.

Each save is written to a temporary directory and renamed when complete (orbax's atomic
commit), so a run killed mid-save keeps every checkpoint it had finished; the unfinished
one is ignored on restore and its temporary directory removed when the next Checkpointer
opens the directory. Saves are asynchronous by default: arrays are copied to host memory
before :meth:`Checkpointer.save` returns (so donating the state to the next step is safe)
and written in a background thread while training goes on. A failed write (disk full,
permissions) is raised by the next call of :meth:`check_for_errors`, :meth:`save` or
:meth:`wait_until_finished` as :class:`CheckpointWriteError`, naming the directory.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Self

import chex
import jax
import numpy as np
from etils import epath

from jaxeff._extras import require

if TYPE_CHECKING:
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

    from jaxeff.train.metrics import MetricWriter
else:
    ocp = require("orbax.checkpoint", extra="train", feature="jaxeff.train")
    policies = ocp.checkpoint_managers.preservation_policy

__all__ = ["CheckpointWriteError", "Checkpointer", "abstract_like", "finish_saves_on_error"]

_MODES = ("max", "min")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the checkpoints committed before it are intact."""


class _DropUntrackedMetricWarning(std_logging.Filter):
    """Saves between evaluations have no metrics by design; orbax warns about each one."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "Requested `tracked_metric`" not in str(record.msg)


std_logging.getLogger("absl").addFilter(_DropUntrackedMetricWarning())


def abstract_like(tree: chex.ArrayTree) -> chex.ArrayTree:
    """Shape/dtype/sharding-only version of a pytree, the target of a restore.

    Args:
      tree: a pytree of ``jax.Array`` (e.g. a freshly created, possibly sharded,
        ``TrainState``), numpy arrays or ``jax.ShapeDtypeStruct`` s.

    Returns:
      The pytree with each leaf a ``jax.ShapeDtypeStruct`` carrying the leaf's sharding
      (``jax.Array`` leaves) so that restored arrays are placed the same way.
    """

    def to_struct(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(to_struct, tree)


def _scalar_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        arr = np.asarray(value)
        if arr.ndim == 0 and arr.dtype.kind in "biuf":
            out[str(key)] = float(arr)
    return out


def _as_path(directory: str | os.PathLike[str]) -> epath.Path:
    text = os.fspath(directory)
    if "://" not in text:
        text = os.path.abspath(text)
    return epath.Path(text)


class Checkpointer:
    """Keeps the latest checkpoint(s) and the best one(s) by a metric, with an extra dict.

    Args:
      directory: root directory (local path or a ``gs://`` URL); created if missing.
      best_metric: name of the metric that ranks checkpoints (e.g. ``"rsum"``); ``None``
        keeps no best checkpoints.
      best_mode: ``"max"`` (higher is better) or ``"min"``. Ties go to the later step.
      keep_latest: how many of the most recent checkpoints to keep.
      keep_best: how many of the best checkpoints to keep.
      async_save: write in a background thread (orbax async checkpointing).

    Every process of a multi-host run must create the Checkpointer and call
    :meth:`save`/:meth:`restore` with the same arguments; orbax writes each array shard
    from the process that holds it and the JSON ``extra`` from process 0.

    Example::

      ckpt = Checkpointer(workdir / "ckpt", best_metric="rsum", best_mode="max")
      if ckpt.latest_step is not None:                       # resume after preemption
        state, extra = ckpt.restore(state)
        data_iter.set_state(extra["data"])
      ...
      ckpt.save(step, state, extra={"data": data_iter.get_state()}, metrics=dev_metrics)
      ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_latest: int = 1,
        keep_best: int = 1,
        async_save: bool = True,
    ):
        if best_mode not in _MODES:
            raise ValueError(f"`best_mode` must be one of {_MODES}, got {best_mode!r}.")
        if not isinstance(keep_latest, int) or keep_latest < 1:
            raise ValueError(f"`keep_latest` must be a positive int, got {keep_latest!r}.")
        if not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"`keep_best` must be a positive int, got {keep_best!r}.")
        if best_metric is not None and not isinstance(best_metric, str):
            raise TypeError(f"`best_metric` must be a str or None, got {best_metric!r}.")
        self.directory = _as_path(directory)
        self.best_metric = best_metric
        self.best_mode = best_mode
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=keep_latest)]
        if best_metric is not None:
            keep.append(
                policies.BestN(
                    get_metric_fn=self._rank_value,
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "extra"),
            options=ocp.CheckpointManagerOptions(
                # best_fn makes orbax store each step's metrics; deletion is the policy's.
                best_fn=None if best_metric is None else self._rank_value,
                preservation_policy=policies.AnyPreservationPolicy(keep),
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
            ),
        )
        self._best_values: list[tuple[float, int]] = []  # (rank value, step), best last
        if best_metric is not None:
            for step in self._manager.all_steps():
                metrics = self._manager.metrics(step) or {}
                if best_metric in metrics:
                    self._best_values.append((self._rank_value(metrics), step))
            self._best_values = sorted(self._best_values)[-keep_best:]
        self._keep_best = keep_best

    # -- queries -----------------------------------------------------------------------
    def _rank_value(self, metrics: Mapping[str, float]) -> float:
        """Larger is better (orbax keeps the last of an ascending sort; ties: later step)."""
        assert self.best_metric is not None  # only ranked with a best_metric
        value = float(metrics[self.best_metric])
        return value if self.best_mode == "max" else -value

    @property
    def latest_step(self) -> int | None:
        """Step of the most recent complete checkpoint, or ``None``."""
        return self._manager.latest_step()

    @property
    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric``, or ``None``."""
        return self._best_values[-1][1] if self._best_values else None

    @property
    def best_value(self) -> float | None:
        """Value of ``best_metric`` at :attr:`best_step`, or ``None``."""
        if not self._best_values:
            return None
        value = self._best_values[-1][0]
        return value if self.best_mode == "max" else -value

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host cluster signalled preemption (all processes agree).

        JAX's preemption service runs only under ``jax.distributed``; a single process
        catches SIGTERM itself (see :class:`jaxeff.train.PreemptionSignal`).
        """
        return self._manager.reached_preemption(step)

    # -- save / restore ----------------------------------------------------------------
    def save(
        self,
        step: int | jax.Array,
        state: chex.ArrayTree,
        *,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Saves ``state``, ``extra`` and ``metrics`` as one checkpoint at ``step``.

        Args:
          step: the step number (int or scalar array), used as the checkpoint's name.
          state: the pytree to save (e.g. a ``TrainState``; may be sharded).
          extra: a JSON-serialisable dict saved alongside (input pipeline state, RNG
            seed, config, ...).
          metrics: evaluation metrics at this step. With ``best_metric`` set, it must be
            among them; a finite value ranks the checkpoint among the best, a non-finite
            one is saved as a plain latest checkpoint.

        Returns:
          Whether the checkpoint is among the ``keep_best`` best so far.

        Raises:
          CheckpointWriteError: an earlier asynchronous save failed, or this one did
            (synchronous saves); nothing more is written.
        """
        step = int(np.asarray(step))
        extra = {} if extra is None else dict(extra)
        try:
            json.dumps(extra)
        except TypeError as e:
            raise TypeError(f"`extra` must be JSON-serialisable: {e}") from e
        ranked_metrics = None
        if self.best_metric is not None and metrics is not None:
            if self.best_metric not in metrics:
                raise KeyError(
                    f"`metrics` has no {self.best_metric!r} (the best_metric); got "
                    f"{sorted(metrics)}."
                )
            scalars = _scalar_floats(metrics)
            if math.isfinite(scalars.get(self.best_metric, math.nan)):
                ranked_metrics = scalars
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
        )
        with _named_failures(self.directory):
            self._manager.save(step, args=args, metrics=ranked_metrics)
        if ranked_metrics is None:
            return False
        self._best_values.append((self._rank_value(ranked_metrics), step))
        self._best_values = sorted(self._best_values)[-self._keep_best :]
        return any(s == step for _, s in self._best_values)

    def restore(
        self, target: chex.ArrayTree, *, which: str = "latest", step: int | None = None
    ) -> tuple[chex.ArrayTree, dict[str, Any]]:
        """Restores a checkpoint into the structure, dtypes and shardings of ``target``.

        Args:
          target: a pytree like the saved state: a freshly created (and placed) state, or
            its :func:`abstract_like`/``jax.eval_shape`` version. Restored arrays take its
            shardings, so a state saved on one device restores sharded and vice versa.
          which: ``"latest"`` or ``"best"``.
          step: a specific step; default the latest (``which="latest"``) or the best.

        Returns:
          ``(state, extra)``: the restored pytree and the saved ``extra`` dict.

        Raises:
          FileNotFoundError: if there is no such checkpoint.
        """
        if which not in ("latest", "best"):
            raise ValueError(f"`which` must be 'latest' or 'best', got {which!r}.")
        if which == "best" and self.best_metric is None:
            raise ValueError("`which='best'` needs a Checkpointer created with best_metric.")
        self.wait_until_finished()
        if step is None:
            step = self.latest_step if which == "latest" else self.best_step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No {which} checkpoint{'' if step is None else f' at step {step}'} in "
                f"{self.directory}."
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.extra or {})

    def check_for_errors(self) -> None:
        """Raises :class:`CheckpointWriteError` if a finished background save failed.

        Cheap (no waiting): call it once per step so that a full disk stops the run at
        the first failed save.
        """
        with _named_failures(self.directory):
            self._manager.check_for_errors()
            # orbax keeps a failed commit's error in its finished finalize thread, raised on
            # joining it; joining a finished thread does not wait.
            if not self._manager.is_saving_in_progress():
                self._manager.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written and committed."""
        with _named_failures(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        with _named_failures(self.directory):
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _named_failures(directory: epath.Path) -> Iterator[None]:
    """Re-raises a failed checkpoint write as a :class:`CheckpointWriteError` naming the path."""
    try:
        yield
    # ENOSPC, EFBIG, EACCES, ...: OSError from Python writes, ValueError from tensorstore.
    except (OSError, ValueError) as error:
        raise CheckpointWriteError(
            f"Writing a checkpoint under {directory} failed: {error}. The checkpoints "
            "committed before it are intact; free space or fix the directory, then rerun "
            "the same command to resume."
        ) from error


@contextlib.contextmanager
def finish_saves_on_error(ckpt: Checkpointer, writer: MetricWriter | None = None) -> Iterator[None]:
    """On an error, lets the checkpoints being written commit, then re-raises.

    Wrap a training loop in it so that a crash (an exception, KeyboardInterrupt) keeps
    every checkpoint it had started writing, and closes ``writer`` (a
    :class:`jaxeff.train.MetricWriter`). A failed write is reported once, by the error
    already being raised.
    """
    try:
        yield
    except BaseException:
        if writer is not None:
            writer.close()
        try:
            ckpt.close()
        except CheckpointWriteError:
            pass
        raise
