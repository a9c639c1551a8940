"""The argument checks every module shares: a bad value gets an error that names the argument and what it needs."""

from numbers import Integral, Real

__all__ = ["positive_int", "positive_real"]


def positive_int(name, value, none_ok=False):
    """Raise ValueError unless value is an int >= 1 (or None, when none_ok); bools are refused. Returns value."""
    if none_ok and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {value!r}")
    return value


def positive_real(name, value):
    """Raise ValueError unless value is a finite or infinite real number > 0 (bools refused). Returns value."""
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value
