"""Metric logging to plain files: JSON lines for notebooks, TensorBoard events for browsing.

``MetricWriter(workdir).write(step, {"loss": ..., "rsum": ...})`` appends one line
``{"step": 100, "time": 1712.3, "loss": 0.51, "rsum": 301.2}`` to
``workdir/metrics.jsonl`` (``time`` is wall-clock seconds since the epoch) and adds each
numeric value as a TensorBoard scalar under ``workdir/tensorboard``. Only process 0 of a
multi-host run writes. :func:`read_metrics` loads the lines back.

Progress bars: use tqdm directly, or :func:`progress_bar`, which starts at the resumed
step and is silent on processes other than 0::

  bar = progress_bar(total_steps, initial=start_step)
  for step in range(start_step, total_steps):
    ...
    bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
    bar.update()
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

import jax
import numpy as np

from jaxeff._extras import require

if TYPE_CHECKING:
    import tqdm
else:
    tqdm = require("tqdm", extra="train", feature="jaxeff.train")

__all__ = [
    "MetricWriter",
    "announce",
    "mean_metrics",
    "progress_bar",
    "read_metrics",
    "to_python_scalars",
]

METRICS_FILENAME = "metrics.jsonl"


def to_python_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Converts jax/numpy scalars of a metrics dict to Python ``bool``/``int``/``float``.

    Strings pass through. Non-finite floats stay floats (``nan``/``inf``; written to JSON as
    ``NaN``/``Infinity``, which Python's ``json`` reads back).

    Raises:
      ValueError: naming the key, for a value that is not a scalar.
    """
    out = {}
    for key, value in metrics.items():
        if isinstance(value, str):
            out[str(key)] = value
            continue
        arr = np.asarray(value)
        if arr.ndim != 0 or arr.dtype.kind not in "biuf":
            raise ValueError(
                f"metrics[{key!r}] must be a numeric scalar or a str, got "
                f"shape {arr.shape} dtype {arr.dtype}."
            )
        out[str(key)] = arr.item()
    return out


class MetricWriter:
    """Writes metrics as JSON lines (``workdir/metrics.jsonl``) and TensorBoard events.

    Args:
      workdir: directory of the run (created if missing). An existing ``metrics.jsonl`` is
        appended to, so a resumed run continues the same file (steps logged after the
        last checkpoint of the killed run appear twice; the later lines are the resumed
        run's).
      tensorboard: also write TensorBoard event files to ``workdir/tensorboard``.
      only_process_zero: in a multi-host run, write only from ``jax.process_index() == 0``
        (the others do nothing).

    Example::

      with MetricWriter(workdir) as writer:
        writer.write(step, {"loss": metrics["loss"], "lr": schedule(step)})
      rows = read_metrics(workdir)     # [{"step": ..., "time": ..., "loss": ..., "lr": ...}]
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        only_process_zero: bool = True,
    ):
        self.workdir = os.fspath(workdir)
        self.active = (not only_process_zero) or jax.process_index() == 0
        self.path = os.path.join(self.workdir, METRICS_FILENAME)
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            tensorboard_x = require(
                "tensorboardX", extra="train", feature="MetricWriter(tensorboard=True)"
            )
            self._tb = tensorboard_x.SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"))

    def write(self, step: int | jax.Array, metrics: Mapping[str, Any]) -> None:
        """Writes one record ``{"step", "time", **metrics}``.

        Args:
          step: the step number (int or scalar array).
          metrics: dict of numeric scalars (jax, numpy or Python) and/or strings.
            Strings go to JSON only.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"`metrics` must be a dict, got {type(metrics).__name__}.")
        if not self.active:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter.write called after close().")
        step = int(np.asarray(step))
        values = to_python_scalars(metrics)
        for key in ("step", "time"):
            if key in values:
                raise ValueError(f"`metrics` must not contain the reserved key {key!r}.")
        record = {"step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if not isinstance(value, str):
                    self._tb.add_scalar(key, float(value), global_step=step)

    def flush(self) -> None:
        """Flushes both outputs to disk."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files; later writes raise."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads the records written by :class:`MetricWriter`.

    Args:
      path: the ``metrics.jsonl`` file or the workdir containing it.

    Returns:
      One dict per line, in order. An incomplete last line (a run killed mid-write) is
      skipped.

    Example::

      rows = read_metrics(workdir)
      losses = [r["loss"] for r in rows if "loss" in r]
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"`path`: no metrics file at {path}.")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # truncated final line, no newline written yet
                break
            raise
    return records


class _LineBar(tqdm.tqdm):
    """A tqdm bar that prints whole lines instead of redrawing one (for logs and files).

    Each refresh appends the bar as a new line; no carriage returns, no clearing.
    """

    leave: bool | None  # tqdm's, declared here as tqdm has no type hints

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        line = self.__str__() if msg is None else msg
        if not line:
            return False  # nothing to clear: printed lines stay
        if msg is not None or self.n != getattr(self, "_printed_n", None):  # no repeats
            self.fp.write(line + "\n")
            self.fp.flush()
            self._printed_n = self.n
        return True

    def clear(self, nolock: bool = False) -> None:
        pass

    def close(self) -> None:
        if not self.disable and self.leave is not False:
            self.display()  # the final line, then tqdm's close with nothing left to clear
        self.leave = False
        super().close()


def progress_bar(
    total: int, *, initial: int = 0, desc: str | None = None, **kwargs: Any
) -> tqdm.tqdm:
    """A ``tqdm`` bar over steps ``initial .. total``, disabled on processes other than 0.

    On a terminal it is tqdm's bar. Where its output is not a terminal (a CI log, a
    ``nohup`` or redirected file) it prints one whole line every ``mininterval`` seconds
    (30 by default) instead of thousands of carriage-return updates.

    Args:
      total: the last step (number of training steps).
      initial: the step training starts (or resumes) from.
      desc: label shown before the bar.
      **kwargs: passed to ``tqdm.tqdm`` (e.g. ``mininterval``, ``file``).

    Returns:
      A ``tqdm.tqdm``; call ``bar.update()`` each step and ``bar.set_postfix(loss=...)``
      to show the loss.
    """
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"`total` must be a non-negative number of steps, got {total!r}.")
    kwargs.setdefault("disable", jax.process_index() != 0)
    file = kwargs.get("file") or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm.tqdm(total=total, initial=initial, desc=desc, **kwargs)
    kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("file", file)
    return _LineBar(total=total, initial=initial, desc=desc, **kwargs)


def mean_metrics(metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """Averages a list of per-step metric dicts (one device-to-host transfer for all)."""
    stacked = jax.device_get(metrics)
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in stacked])) for k in stacked[0]}


def announce(message: str) -> None:
    """A status line the user sees at any logging verbosity (process 0, above a tqdm bar)."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)
