"""Flags: argparse types that check a number when it is parsed, so that a flag which would silently do the wrong
thing (`--max-steps -5`, `--batch-size 0`, `--top-p 2`, `--lr nan`) stops at once with argparse's usage error; and typed
settings read once from the parsed flags (`from_flags`), so that a function receives the fields it uses."""
import argparse
import math
from dataclasses import fields


def number(kind=int, low=None, high=None, low_open=False, high_open=False):
    """A type for `add_argument(type=...)`: a finite `kind` in [low, high] (an open end excludes the bound)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


FINITE = number(float)
COUNT = number(int, low=1)  # steps, samples, batch sizes: at least 1
COUNT_OR_ZERO = number(int, low=0)  # 0 documented as "off" / "from --epochs"
POSITIVE = number(float, low=0, low_open=True)
NON_NEGATIVE = number(float, low=0)
PROBABILITY = number(float, low=0, high=1, low_open=True)  # (0, 1]
DROPOUT = number(float, low=0, high=1, high_open=True)  # [0, 1)


def from_flags(cls, args: argparse.Namespace):
    """A settings dataclass from the parsed flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
