"""Checks of numeric hyperparameters where a factory or function is given them.

A learning rate, decay or fraction that is NaN, infinite, negative or not a number at all
should fail when the transform is built, naming the argument, not as a NaN loss many
steps later. :func:`check_number` checks the values it can read: Python numbers and
concrete 0-d numpy or jax arrays. It passes through what it cannot read:

* a traced value (a ``jax.core.Tracer``: the factory called inside ``jit``, ``grad`` or
  ``vmap``), whose value the step's own finite check sees, and likewise a jax array
  that is not fully addressable from this process;
* with ``schedule=True``, a callable (an optax schedule ``step -> value``).

An argument that is used as a Python number (a static argument of a jitted function, or
host-side code) cannot be traced: ``static=True`` refuses a tracer with an error naming
the argument instead of an obscure one from jax later.

Every bound is finite and every accepted value too: no hyperparameter checked here means
anything at infinity. (``jaxeff.privacy.clipped_grad``, whose ``l2_clip_norm=inf`` means
"no clipping", keeps its own check.)
"""

from __future__ import annotations

import math
import numbers
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["check_number"]

_T = TypeVar("_T")


def _describe(
    at_least: float | None,
    above: float | None,
    at_most: float | None,
    below: float | None,
    schedule: bool,
) -> str:
    """``"a finite number >= 0"``, ``"a number in [0, 1)"``, ... for an error message."""
    # (bracket, bound, comparison)
    low: tuple[str, float, str] | None = None
    high: tuple[str, float, str] | None = None
    if at_least is not None:
        low = ("[", at_least, ">=")
    elif above is not None:
        low = ("(", above, ">")
    if at_most is not None:
        high = ("]", at_most, "<=")
    elif below is not None:
        high = (")", below, "<")
    one = low or high
    if low and high:
        text = f"a number in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif one:
        _, bound, comparison = one
        text = f"a finite number {comparison} {bound:g}"
    else:
        text = "a finite number"
    return text + (" or a schedule (a callable of the step)" if schedule else "")


def _unreadable(value: Any) -> bool:
    """Whether ``value``'s number cannot be read here: traced, or on other processes."""
    if isinstance(value, jax.core.Tracer):
        return True
    return isinstance(value, jax.Array) and not value.is_fully_addressable


def _is_real_number(value: Any) -> bool:
    """A Python or numpy integer or float (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_real_scalar_array(value: Any) -> bool:
    """A 0-d numpy or jax array of an integer or floating dtype (bfloat16 included)."""
    if not isinstance(value, np.ndarray | jax.Array) or np.ndim(value) != 0:
        return False
    dtype = value.dtype
    return jax.dtypes.issubdtype(dtype, np.integer) or jax.dtypes.issubdtype(dtype, np.floating)


def check_number(
    value: _T,
    name: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    schedule: bool = False,
    static: bool = False,
) -> _T:
    """Raises unless ``value`` is a finite real number within the bounds given.

    Args:
      value: the hyperparameter: a Python ``int`` or ``float``, a 0-d numpy or jax array
        of integer or floating dtype, a tracer, or (with ``schedule``) a callable.
      name: the argument's name, for the message (``"learning_rate"``).
      at_least, above: the lower bound, inclusive or exclusive (at most one of them).
      at_most, below: the upper bound, inclusive or exclusive (at most one of them).
      schedule: accept a callable (an optax schedule) unchecked.
      static: refuse a traced value (the caller needs the number itself).

    Returns:
      ``value`` itself (not converted), so that a jax array keeps its dtype and sharding.

    Raises:
      TypeError: naming the argument for a value that is not a real scalar (a bool, a
        string, a complex number, ``None``, an array with dimensions), or a traced value
        with ``static``.
      ValueError: naming the argument and the accepted range for NaN, an infinity or a
        number outside the bounds, e.g. "`learning_rate` must be a finite number >= 0 or
        a schedule (a callable of the step), got nan."
    """
    if at_least is not None and above is not None or at_most is not None and below is not None:
        raise ValueError("check_number takes one lower and one upper bound at most.")
    expected = _describe(at_least, above, at_most, below, schedule)
    if schedule and callable(value):
        return value
    if _unreadable(value):
        if static:
            raise TypeError(
                f"`{name}` must be a concrete number (it is used as a Python number, not "
                f"traced): {expected}, got the traced value {value}."
            )
        return value
    if not (_is_real_number(value) or _is_real_scalar_array(value)):
        raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
    number = float(np.asarray(value))
    in_range = (
        math.isfinite(number)
        and (at_least is None or number >= at_least)
        and (above is None or number > above)
        and (at_most is None or number <= at_most)
        and (below is None or number < below)
    )
    if not in_range:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")
    return value
