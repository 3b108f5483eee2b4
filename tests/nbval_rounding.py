"""Rounding of floats in notebook outputs before nbval compares them (used by the root conftest.py)."""

import re

_FLOAT = re.compile(r"(?<![\w.])(-?\d+\.\d{3,})(?![\w.])")


def round_floats(text: str) -> str:
    """Every decimal with 3 or more decimals rounded to 2 (``-0.00`` written ``0.00``)."""

    def fix(m: re.Match) -> str:
        out = f"{round(float(m.group(1)), 2):.2f}"
        return "0.00" if out == "-0.00" else out

    return _FLOAT.sub(fix, text)
