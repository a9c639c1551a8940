"""The argument checks every module shares: a bad value gets an error that names the argument and what it needs."""

import math
from numbers import Integral, Real

__all__ = ["positive_int", "positive_real"]


def positive_int(name, value, none_ok=False):
    """Raise ValueError unless value is an int >= 1 (or None, when none_ok); bools are refused. Returns value."""
    if none_ok and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}")
    return value


def positive_real(name, value, finite=False):
    """Raise ValueError unless value is a real number > 0 (bools and nan refused; infinity too when finite).
    Returns value. finite=True is for what would turn every number after it into inf or nan (an eps, an init std)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}positive number, got {value!r}")
    return value
