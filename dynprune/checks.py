"""Argument checks shared by the tasks: a number outside its range (nan and inf included) is a ValueError
that names the argument, its value and the allowed range, before any training starts."""

from __future__ import annotations

import math
import numbers


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> None:
    """Raise unless ``value`` is a finite number (an integer if ``integer``) in the interval from ``low`` to ``high``
    (each end closed unless ``low_open``/``high_open``)."""
    if math.isinf(low) and math.isinf(high):
        rule = ""
    elif math.isinf(high):
        rule = f" {'>' if low_open else '>='} {low:g}"
    elif math.isinf(low):
        rule = f" {'<' if high_open else '<='} {high:g}"
    else:
        rule = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    wanted = numbers.Integral if integer else numbers.Real
    if not isinstance(value, wanted) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'}{rule}, got {value!r}")
    if not ((low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
        raise ValueError(f"{name} must be{rule}, got {value!r}")
