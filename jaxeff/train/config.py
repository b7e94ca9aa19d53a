"""ml_collections configs: command-line-style overrides for notebooks/tests, JSON for results.

Experiments define their config with ``config_flags.DEFINE_config_file("config", ...)``
and run as ``python -m experiments.vse.main --config=experiments/vse/configs/default.py
--config.batch_size=64``. The helpers here apply the very same absl parser without a
command line (``load_config``/``parse_config_overrides``) and save the resolved config
next to the results (``config_to_json``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

__all__ = ["config_to_json", "load_config", "parse_config_overrides"]


def _override_args(overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str) or not isinstance(overrides, Sequence):
        raise TypeError(f"`overrides` must be a list of 'field=value' strings, got {overrides!r}.")
    args = []
    for item in overrides:
        if not isinstance(item, str) or not item:
            raise TypeError(f"`overrides` entries must be non-empty strings, got {item!r}.")
        item = item.removeprefix("--").removeprefix("config.")
        args.append(f"--config.{item}")
    return args


def _parse(define, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    argv = ["config", *_override_args(overrides)]
    flag_values = flags.FlagValues()
    try:
        define(flag_values, argv)
        flag_values(argv)
    except AttributeError as e:
        raise ValueError(
            f"`overrides` {list(overrides)} name a field the config does not have: {e}"
        ) from e
    except flags.Error as e:
        raise ValueError(f"`overrides`: {e}") from e
    return flag_values["config"].value


def parse_config_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """Applies command-line-style overrides to a copy of ``config``.

    Parsing is exactly that of ``--config.<field>=<value>`` on the command line (types are
    those of the existing fields; ``"flag"`` alone sets a bool to true).

    Args:
      config: an ``ml_collections.ConfigDict`` (not modified).
      overrides: strings ``"field.sub=value"`` (a leading ``--config.`` is allowed).

    Returns:
      A new ``ConfigDict`` with the overrides applied, locked as on the command line
      (existing fields can change, new ones cannot be added; ``config.unlocked()``
      lifts that).

    Raises:
      ValueError: for an unknown field or a value of the wrong type.

    Example::

      config = parse_config_overrides(get_config(), ["batch_size=64", "model.dim=256"])
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(
            f"`config` must be an ml_collections.ConfigDict, got {type(config).__name__}."
        )
    config = copy.deepcopy(config)

    def define(flag_values, argv):
        config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)

    return _parse(define, overrides)


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads a config file (its ``get_config()``) and applies overrides, as ``--config=``.

    Args:
      path: a Python file defining ``get_config()``; ``"file.py:arg"`` passes ``arg`` to
        ``get_config``, as on the command line.
      overrides: strings ``"field.sub=value"``.

    Returns:
      The ``ConfigDict``.

    Example::

      config = load_config("experiments/vse/configs/default.py", ["num_steps=10"])
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a path string, got {type(path).__name__}.")
    path = os.fspath(path)
    if not os.path.exists(path.split(":", 1)[0]):
        raise FileNotFoundError(f"`path`: no config file {path.split(':', 1)[0]}.")

    def define(flag_values, argv):
        config_flags.DEFINE_config_file(
            "config", path, flag_values=flag_values, sys_argv=argv, lock_config=True
        )

    return _parse(define, overrides)


def config_to_json(config, path=None) -> str:
    """Serialises a config to indented JSON, optionally writing it to ``path``.

    Args:
      config: an ``ml_collections.ConfigDict`` or a plain dict. Values JSON cannot hold
        (functions, objects) are written as strings.
      path: optional file to write (its directory is created).

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
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return text
