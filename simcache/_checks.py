"""Argument checks for the Python API: one-line :class:`SimcacheError` for every bad value.

Each check returns the value in its plain Python form (``int``, ``float``, ``str``) and never
truncates: ``seed=1.5`` is an error, not seed 1. Booleans are not integers here.

>>> integer("seed", 3, lo=0)
3
>>> integer("seed", 1.5, lo=0)
Traceback (most recent call last):
...
simcache.errors.SimcacheError: seed must be a non-negative integer, got 1.5
"""

from __future__ import annotations

import numbers
import os

import numpy as np

from simcache.errors import SimcacheError

UINT64_MAX = 2**64 - 1
EXACT_FLOAT_MAX = 2**53  # above this a float64 no longer holds every whole number


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(name, value, lo, hi, kind="number"):
    if lo is not None and value < lo:
        if kind == "integer" and lo in (0, 1):
            raise SimcacheError(f"{name} must be a {'positive' if lo else 'non-negative'} integer, got {value}")
        raise SimcacheError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise SimcacheError(f"{name} must be <= {hi}, got {value}")
    return value


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """A whole number (Python or numpy integer, not bool) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(lo, "an integer")
        raise SimcacheError(f"{name} must be {kind}, got {_shown(value)}")
    return _range(name, int(value), lo, hi, "integer")


def optional_integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int | None:
    return None if value is None else integer(name, value, lo, hi)


def number(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number (int or float, not bool) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise SimcacheError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise SimcacheError(f"{name} must be finite, got {value}")
    return _range(name, value, lo, hi)


def flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise SimcacheError(f"{name} must be True or False, got {_shown(value)}")
    return bool(value)


def choice(name: str, value, options) -> str:
    """One of ``options`` (strings)."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise SimcacheError(f"{name} must be one of {', '.join(options)}, got {_shown(value)}")
    return value


def text(name: str, value) -> str:
    if not isinstance(value, str):
        raise SimcacheError(f"{name} must be a string, got {_shown(value)}")
    return value


def instance(name: str, value, kind, what: str | None = None):
    """``value`` when it is a ``kind`` (a class or a tuple of classes)."""
    if not isinstance(value, kind):
        if what is None:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            what = " or ".join(k.__name__ for k in kinds)
        hint = " (read it first)" if isinstance(value, (str, os.PathLike)) else ""
        raise SimcacheError(f"{name} must be a {what}, got {type(value).__name__}{hint}")
    return value


def counts(name: str, values) -> np.ndarray:
    """Non-negative real counts as float64: refuses strings, objects, complex numbers, NaN,
    infinities and totals beyond 2**53, where float64 stops counting in whole steps (row
    sums and products over such counts overflow and every statistic built on them is noise)."""
    a = np.asarray(values)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise SimcacheError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise SimcacheError(f"{name} must be finite (found NaN or infinity)")
    if a.size and a.min() < 0:
        raise SimcacheError(f"{name} must be non-negative (found {a.min():g})")
    with np.errstate(over="ignore"):
        total = float(a.sum())
    if not total <= EXACT_FLOAT_MAX:
        shown = "overflows float64" if total == float("inf") else f"{total:.3g}"
        raise SimcacheError(f"{name} total ({shown}) exceeds 2^53; scale the counts down")
    return a
