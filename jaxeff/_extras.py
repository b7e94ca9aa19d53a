"""Optional dependencies: import one, or say which extra installs it.

``pip install jaxeff`` brings jax, flax, optax, chex and numpy only. The rest sits in
extras named for what they enable (``pyproject.toml``); a module that needs one imports it
through :func:`require`, so a missing package surfaces as one clear line with the command
that installs it, not as a ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
import types

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> types.ModuleType:
    """``import module``, or an ``ImportError`` naming ``feature`` and the extra to install.

    Only the absence of the top-level package (the distribution the extra installs) is
    translated; any other error raised while importing an installed package propagates
    as it is.

    Args:
      module: the dotted module name, e.g. ``"cvxpy"`` or ``"orbax.checkpoint"``.
      extra: the jaxeff extra that installs it, e.g. ``"robust"``.
      feature: what needs it, for the message, e.g. ``"jaxeff.robust.max_margin"``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name != top:
            raise
        raise ImportError(
            f'{feature} needs {top}, which is not installed: pip install "jaxeff[{extra}]"'
        ) from err
