"""The mechanisms fedgate accounts for, as plain values a ledger can store and replay.

Two kinds, both Gaussian:
- `DpSgdEvent`: `steps` steps of DP-SGD run by the hospital's own trainer: Poisson sampling of
  each record with probability `sample_rate`, each record's gradient clipped to C, Gaussian
  noise of standard deviation `noise_multiplier`·C on the sum. A record-level mechanism.
- `UpdateNoiseEvent`: `count` replies through the gate, each the whole update clipped to L2
  norm C plus Gaussian noise σ = `noise_multiplier`·C (z = σ/C). A hospital-level mechanism.

Floats are stored as the shortest decimal string that parses back to the same double (Python's
`repr`), so an ε recomputed from a ledger's events equals the one recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedgate.errors import FedgateError


class PrivacyError(FedgateError):
    """An event, a delta or a budget is not well formed; the message names the field."""


def exact_str(value: float) -> str:
    """A float as the shortest decimal string that parses back to the same double ("inf" for
    infinity: a mechanism without noise)."""
    return repr(float(value))


def _finite(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PrivacyError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise PrivacyError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def _count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PrivacyError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class DpSgdEvent:
    """`steps` DP-SGD steps: Poisson sampling at `sample_rate`, per-record clipping, noise z·C."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        _finite("sample_rate", self.sample_rate, 0.0, 1.0, low_open=True)
        _finite("noise_multiplier", self.noise_multiplier, 0.0, 1e6)
        _count("steps", self.steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "dp-sgd",
            "sample_rate": exact_str(self.sample_rate),
            "noise_multiplier": exact_str(self.noise_multiplier),
            "steps": self.steps,
        }


@dataclass(frozen=True)
class UpdateNoiseEvent:
    """`count` gate replies, each the update clipped to C plus Gaussian noise σ = z·C."""

    noise_multiplier: float
    count: int = 1

    def __post_init__(self) -> None:
        _finite("noise_multiplier", self.noise_multiplier, 0.0, 1e6)
        _count("count", self.count)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "update-noise", "noise_multiplier": exact_str(self.noise_multiplier), "count": self.count}


PrivacyEvent = DpSgdEvent | UpdateNoiseEvent


def event_from_json(value: Any) -> PrivacyEvent:
    """The inverse of `to_json`, strict: unknown kinds or fields are refused."""
    if not isinstance(value, dict):
        raise PrivacyError(f"a privacy event is a JSON object, got {type(value).__name__}")
    fields = {
        "dp-sgd": {"kind", "sample_rate", "noise_multiplier", "steps"},
        "update-noise": {"kind", "noise_multiplier", "count"},
    }
    kind = value.get("kind")
    if kind not in fields:
        raise PrivacyError(f"unknown privacy event kind {kind!r} (dp-sgd, update-noise)")
    if set(value) != fields[kind]:
        raise PrivacyError(f"{kind} event has fields {sorted(value)}, expected {sorted(fields[kind])}")

    def number(key: str) -> float:
        text = value[key]
        if not isinstance(text, str):
            raise PrivacyError(f"{kind}.{key} must be a decimal string, got {text!r}")
        try:
            return float(text)
        except ValueError as err:
            raise PrivacyError(f"{kind}.{key} is not a decimal number: {text!r}") from err

    if kind == "dp-sgd":
        return DpSgdEvent(number("sample_rate"), number("noise_multiplier"), value["steps"])
    return UpdateNoiseEvent(number("noise_multiplier"), value["count"])
