"""Comparing generated doc text whose numbers were computed on another CPU.

The docs print values the shipped bank computes in float32 (ONNX Runtime's kernels differ
between CPUs in the last bits) rounded to a few decimals. A value within that float32 noise
of a rounding boundary may print one unit higher or lower in its last decimal on another
machine; anything else about the text (words, integers, order) must not change.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def _decimals(number: str) -> int:
    if "e" in number.lower() or "." not in number:
        return 0
    return len(number.split(".", 1)[1])


def same_to_last_digit(old: str, new: str) -> bool:
    """Whether ``new`` says what ``old`` says: the same text around the numbers, the same
    integers, and decimals that differ by at most one unit in the last place printed (the
    larger number of decimals of the two). A number in exponent form must be equal."""
    a, b = NUMBER.split(old), NUMBER.split(new)
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            continue
        if i % 2 == 0:  # text between numbers
            return False
        places = max(_decimals(x), _decimals(y))
        if places == 0:
            return False
        # both are printed with at most `places` decimals: their difference in units of the
        # last place is an integer up to float64 rounding of the parse (far below 0.5)
        if round(abs(float(x) - float(y)) * 10**places) > 1:
            return False
    return True
