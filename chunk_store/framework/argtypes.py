"""argparse ``type=`` functions shared by every command line (retro-build-index, train.py,
retro.evaluate, retro.generate).

Why one place: a value that parses but means nothing (a negative batch size, a NaN temperature,
a prompt that is not UTF-8) must be refused by the parser, in one line with exit status 2, before
any model or database is opened; checked later it becomes a traceback or a silently wrong result.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low`` (``positive`` = at least 1, ``count`` = at least 0)."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
count_int = int_at_least(0)


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False
             ) -> Callable[[str], float]:
    """A finite float in [low, high] (an end excluded when open); NaN and inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}{low}, {high}{hi}")
        return value

    parse.__name__ = "number"
    return parse


def utf8_text(text: str) -> str:
    """Text that is valid UTF-8 (an argv byte that is not comes in as a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 (byte at position {e.start})") from None
    return text


utf8_text.__name__ = "text"

__all__ = ["count_int", "float_in", "int_at_least", "positive_int", "utf8_text"]
