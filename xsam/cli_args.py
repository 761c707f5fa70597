"""Argument types shared by the ``xsam`` subcommands: every bad value is refused while parsing, before any
work, in one line (``xsam bench: error: argument --scale: ...``) with exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["OneLineErrorParser", "choices_list", "number", "output_dir"]


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str):  # noqa: D102
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False
           ) -> Callable[[str], float | int]:
    """An argparse type: a finite ``kind`` (int or float) in [low, high] ((low, high] with ``low_open``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            text_of = str if kind is int else "{:g}".format
            lo = "" if low is None else (f"> {text_of(low)}" if low_open else f">= {text_of(low)}")
            hi = "" if high is None else f"<= {text_of(high)}"
            bounds = " and ".join(filter(None, (lo, hi)))
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def choices_list(allowed: Iterable[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of ``allowed``."""
    allowed = tuple(allowed)

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                                             f"use some of {','.join(allowed)}")
        return items

    parse.__name__ = "list"
    return parse


def output_dir(text: str) -> Path:
    """An argparse type: a folder that exists or can be created (it is created now)."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create the output folder {text!r}: {exc.strerror or exc}")
    return path
