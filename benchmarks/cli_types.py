"""argparse types shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def method_list(known: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """A type for `--methods a,b` that refuses names outside `known`."""
    names_known = tuple(known)

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [n for n in names if n not in names_known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; use {', '.join(names_known)}")
        return names

    return parse


def option_override(text: str) -> tuple[str, Any]:
    """`--option key=value`: a CompressOptions field and a JSON value (strings may go unquoted)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
