"""Checkpoints with orbax: the latest one (to resume after preemption) and the best ones.

Layout under ``directory``::

  latest/<step>/state   the TrainState pytree (orbax StandardSave, sharded arrays)
  latest/<step>/extra   a JSON dict: input-pipeline position, RNG seed, config, ...
  best/<step>/...       the same two items for the best steps by ``best_metric``

Each save is written to a temporary directory and renamed when complete (orbax's atomic
commit), so a run killed mid-save keeps every checkpoint it had finished; the unfinished
one is ignored on restore. Saves are asynchronous by default: arrays are copied to host
memory before :meth:`Checkpointer.save` returns (so donating the state to the next step
is safe) and written in a background thread while training goes on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "abstract_like"]

_MODES = ("max", "min")


def abstract_like(tree):
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


def _as_path(directory) -> epath.Path:
    text = os.fspath(directory)
    if "://" not in text:
        text = os.path.abspath(text)
    return epath.Path(text)


class Checkpointer:
    """Keeps the latest checkpoint(s) and the best one(s) by a metric, with an extra dict.

    Args:
      directory: root directory (local path or a ``gs://`` URL); created if missing.
      best_metric: name of the metric that ranks checkpoints in ``best/`` (e.g.
        ``"rsum"``); ``None`` keeps no best checkpoints.
      best_mode: ``"max"`` (higher is better) or ``"min"``.
      keep_latest: how many of the most recent checkpoints to keep in ``latest/``.
      keep_best: how many of the best checkpoints to keep in ``best/``.
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
        directory,
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
        self.keep_best = keep_best
        items = ("state", "extra")
        self._latest = ocp.CheckpointManager(
            self.directory / "latest",
            item_names=items,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_latest, enable_async_checkpointing=async_save
            ),
        )
        self._best = None
        self._best_values: list[tuple[float, int]] = []
        if best_metric is not None:
            self._best = ocp.CheckpointManager(
                self.directory / "best",
                item_names=items,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best,
                    best_fn=lambda m: m[best_metric],
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    enable_async_checkpointing=async_save,
                ),
            )
            for step in self._best.all_steps():
                value = (self._best.metrics(step) or {}).get(best_metric)
                if value is not None:
                    self._best_values.append((float(value), step))

    # -- queries -----------------------------------------------------------------------
    @property
    def latest_step(self) -> int | None:
        """Step of the most recent complete checkpoint in ``latest/``, or ``None``."""
        return self._latest.latest_step()

    @property
    def best_step(self) -> int | None:
        """Step of the best checkpoint by ``best_metric``, or ``None``."""
        if not self._best_values:
            return None
        return self._ranked()[0][1]

    @property
    def best_value(self) -> float | None:
        """Value of ``best_metric`` at :attr:`best_step`, or ``None``."""
        if not self._best_values:
            return None
        return self._ranked()[0][0]

    def _ranked(self) -> list[tuple[float, int]]:
        return sorted(self._best_values, key=lambda vs: vs[0], reverse=self.best_mode == "max")

    def _is_better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if len(self._best_values) < self.keep_best:
            return True
        worst = self._ranked()[-1][0]
        return value > worst if self.best_mode == "max" else value < worst

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster signalled preemption; save and exit (all processes agree)."""
        return self._latest.reached_preemption(step)

    # -- save / restore ----------------------------------------------------------------
    def save(
        self,
        step: int,
        state,
        *,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> bool:
        """Saves ``state`` and ``extra`` as the latest checkpoint, and as a best one if due.

        Args:
          step: the step number (int or scalar array), used as the checkpoint's name.
          state: the pytree to save (e.g. a ``TrainState``; may be sharded).
          extra: a JSON-serialisable dict saved alongside (input pipeline state, RNG
            seed, config, ...).
          metrics: evaluation metrics at this step; when ``best_metric`` is set and
            ``metrics[best_metric]`` is finite and among the ``keep_best`` best so far,
            the checkpoint is also saved in ``best/``.

        Returns:
          Whether the checkpoint was saved as a best one.
        """
        step = int(np.asarray(step))
        extra = {} if extra is None else dict(extra)
        try:
            json.dumps(extra)
        except TypeError as e:
            raise TypeError(f"`extra` must be JSON-serialisable: {e}") from e
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
        )
        self._latest.save(step, args=args)
        if self._best is None or metrics is None:
            return False
        if self.best_metric not in metrics:
            raise KeyError(
                f"`metrics` has no {self.best_metric!r} (the best_metric); got {sorted(metrics)}."
            )
        value = float(np.asarray(metrics[self.best_metric]))
        if not self._is_better(value):
            return False
        scalars = _scalar_floats(metrics)
        self._best.save(step, args=args, metrics=scalars)
        self._best_values.append((value, step))
        self._best_values = self._ranked()[: self.keep_best]
        return True

    def restore(self, target, *, which: str = "latest", step: int | None = None):
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
        if which == "best" and self._best is None:
            raise ValueError("`which='best'` needs a Checkpointer created with best_metric.")
        manager = self._latest if which == "latest" else self._best
        manager.wait_until_finished()
        if step is None:
            step = self.latest_step if which == "latest" else self.best_step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"No {which} checkpoint{'' if step is None else f' at step {step}'} in "
                f"{self.directory / which}."
            )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)),
                extra=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.extra or {})

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves are written and committed."""
        self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._latest.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
