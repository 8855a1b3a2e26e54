"""Canonical JSON: the one byte form of every record that gets hashed or signed.

Sorted keys, no insignificant white space, UTF-8. Floats are rejected: their text form is
not unique across languages, so evidence carries them as decimal strings (`decimal_str`)."""

from __future__ import annotations

import json
import math
from typing import Any


def _check(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise TypeError(f"float at {path or '<root>'}: use decimal_str() so the hash is stable")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"non-string key {key!r} at {path or '<root>'}")
            _check(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check(item, f"{path}[{index}]")


def canonical_json(value: Any) -> bytes:
    _check(value, "")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decimal_str(value: float, digits: int = 12) -> str:
    """A float as a fixed decimal string (`repr` round-trips but differs across languages)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"
