"""Configs: checked at start-up, saved next to the results, and bound to their workdir.

Experiments define their config with ``config_flags.DEFINE_config_file("config", ...)``
and run as ``python -m experiments.vsepp.main --config=experiments/vsepp/configs/default.py
--config.batch_size=64``. Before anything is built, a run checks its numeric fields
(:func:`check_numbers`) and that its workdir was not made by a different config
(:func:`bind_config_to_workdir`), which also saves the resolved config as
``<workdir>/config.json`` (:func:`config_to_json`).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax

from jaxeff._extras import require

if TYPE_CHECKING:
    import ml_collections
else:
    ml_collections = require("ml_collections", extra="train", feature="jaxeff.train")

__all__ = ["bind_config_to_workdir", "check_numbers", "config_differences", "config_to_json"]

CONFIG_FILENAME = "config.json"


def config_to_json(
    config: ml_collections.ConfigDict | dict[str, Any], path: str | os.PathLike[str] | None = None
) -> str:
    """Serialises a config to indented JSON, optionally writing it to ``path`` atomically.

    Args:
      config: an ``ml_collections.ConfigDict`` or a plain dict. Values JSON cannot hold
        (functions, objects) are written as strings.
      path: optional file to write (its directory is created). The text goes to a
        temporary file first and is renamed over ``path``, so a kill never leaves a
        truncated config.

    Returns:
      The JSON text.

    Example::

      config_to_json(config, os.path.join(workdir, "config.json"))
    """
    if isinstance(config, ml_collections.ConfigDict):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    elif isinstance(config, dict):
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
    else:
        raise TypeError(f"`config` must be a ConfigDict or dict, got {type(config).__name__}.")
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    return text


def _get(config: ml_collections.ConfigDict | Mapping[str, Any], field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def check_numbers(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    *,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    fraction: Iterable[str] = (),
    integers: Mapping[str, int] | None = None,
) -> None:
    """Checks numeric config fields before anything is built, naming the field on failure.

    Args:
      config: an ``ml_collections.ConfigDict`` (or nested dicts).
      positive: dotted field names that must be finite numbers ``> 0``.
      non_negative: dotted field names that must be finite numbers ``>= 0``.
      fraction: dotted field names that must lie in ``[0, 1)``.
      integers: ``{dotted field name: least value}``: fields that must be Python ints (not
        bools, not floats) at least that value; checked after the others.

    Raises:
      ValueError: ``config.<field> must be ..., got <value>`` for the first bad field
        (booleans and strings are not numbers).

    Example::

      check_numbers(config, positive=["learning_rate"], fraction=["decay"],
                    integers={"batch_size": 1, "seed": 0})
    """
    rules = (
        (positive, lambda v: v > 0, "a positive number"),
        (non_negative, lambda v: v >= 0, "a non-negative number"),
        (fraction, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    )
    for fields, ok, expected in rules:
        for field in fields:
            value = _get(config, field)
            is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and ok(value)):
                raise ValueError(f"config.{field} must be {expected}, got {value!r}.")
    for field, minimum in (integers or {}).items():
        value = _get(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"config.{field} must be an integer >= {minimum}, got {value!r}.")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(
    old: Mapping[str, Any], new: ml_collections.ConfigDict | dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two configs: ``{dotted field: (old, new)}``.

    Both are compared as JSON (tuples equal lists); a field present in one only differs
    with ``<missing>`` on the other side.
    """
    old = _flatten(json.loads(config_to_json(dict(old))))
    new = _flatten(json.loads(config_to_json(new)))
    missing = "<missing>"
    return {
        k: (old.get(k, missing), new.get(k, missing))
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    }


def bind_config_to_workdir(
    config: ml_collections.ConfigDict | dict[str, Any],
    workdir: str | os.PathLike[str],
    *,
    may_differ: Iterable[str] = (),
    allow_changes: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Refuses to reuse a workdir made by a different config; saves ``config.json``.

    A resumed run must continue the run its checkpoints came from. When
    ``<workdir>/config.json`` exists, every field outside ``may_differ`` (fields such as
    logging intervals that do not change the result) must equal the new config's.
    ``config.json`` is written only once the config is known to match (process 0 only).

    Args:
      config: the run's ``ml_collections.ConfigDict``.
      workdir: the run's directory (created if missing).
      may_differ: dotted field names allowed to change between runs of one workdir.
      allow_changes: continue despite other differences (the new config is saved).

    Returns:
      The differing fields, ``{field: (old, new)}`` (empty for a new or matching workdir).

    Raises:
      ValueError: listing each differing field with its old and new value.
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILENAME)
    changes = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                saved = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); move it away.") from None
        allowed = set(may_differ)
        changes = config_differences(saved, config)
        blocking = {k: v for k, v in changes.items() if k not in allowed}
        if blocking and not allow_changes:
            listing = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in blocking.items())
            raise ValueError(
                f"{workdir} holds a run with a different config:\n{listing}\n"
                "Use a new workdir, or allow the change explicitly (--allow_config_change) "
                "to continue this run with the new values."
            )
    if jax.process_index() == 0 and (changes or not os.path.exists(path)):
        config_to_json(config, path)
    return changes
