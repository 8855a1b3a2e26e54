"""The hospital's `[secagg]` policy table: whether its gate answers Flower's SecAgg+ stages itself,
what it accepts from the server's workflow, and the honesty assumption its noise rests on.

    [secagg]
    enabled = true        # the gate answers setup / share-keys / unmask and masks its reply
    threshold = 3         # refuse a round whose reconstruction threshold is lower than this
    assumed_honest = 3    # t: the sum holds at least t honest hospitals' replies (default: threshold)
    require = true        # refuse every train instruction that does not come through SecAgg+

Why `assumed_honest` is separate: in `noise_mode = "distributed"` each hospital adds sigma/sqrt(t),
so the noise in the sum reaches sigma only if at least t of the summed replies carry honest
noise. The protocol guarantees at least `threshold` replies in every sum it lets the server
unmask; how many of them are honest is an assumption, and it is recorded beside every bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedgate.errors import PolicyError

KNOWN = ("enabled", "threshold", "assumed_honest", "require")
MIN_THRESHOLD = 2


@dataclass(frozen=True)
class SecAggPolicy:
    enabled: bool = False
    threshold: int = 3
    assumed_honest: int = 3
    require: bool = True

    @property
    def honest(self) -> int:
        """t, the number of honest replies every unmasked sum is assumed to hold."""
        return self.assumed_honest

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "threshold": self.threshold,
            "assumed_honest": self.assumed_honest,
            "require": self.require,
        }


def _get(table: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PolicyError(f"secagg.{key} must be {kind.__name__}, got {value!r}")
    return value


def parse_secagg_policy(table: dict[str, Any]) -> SecAggPolicy:
    """The `[secagg]` table (already read from TOML) as a policy; errors name the key."""
    if not isinstance(table, dict):
        raise PolicyError("[secagg] must be a table")
    unknown = sorted(set(table) - set(KNOWN))
    if unknown:
        raise PolicyError(f"unknown key(s) in [secagg]: {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    enabled = _get(table, "enabled", bool, False)
    threshold = _get(table, "threshold", int, 3)
    if threshold < MIN_THRESHOLD:
        raise PolicyError(f"secagg.threshold must be >= {MIN_THRESHOLD}, got {threshold}")
    honest = _get(table, "assumed_honest", int, threshold)
    if not 1 <= honest <= threshold:
        raise PolicyError(
            f"secagg.assumed_honest must be between 1 and secagg.threshold ({threshold}), got {honest}: "
            "the protocol only guarantees `threshold` replies in a sum, so more honest ones cannot be assumed"
        )
    require = _get(table, "require", bool, True)
    return SecAggPolicy(enabled, threshold, honest, require)


def majority(hospitals: int) -> int:
    """A threshold for n hospitals: a majority (Flower keeps it below the n shares)."""
    return max(MIN_THRESHOLD, hospitals // 2 + 1)


def with_secagg_table(text: str, hospitals: int) -> str:
    """A policy's text with SecAgg+ on (`fedgate demo --secagg`): its own [secagg] table if it has
    one (which must enable it), else one appended with a majority threshold."""
    import tomllib

    try:
        table = tomllib.loads(text).get("secagg")
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"the policy is not valid TOML: {err}") from err
    if table is not None:
        if not parse_secagg_policy(table).enabled:
            raise PolicyError("secagg.enabled is false in the policy, but SecAgg+ was asked for")
        return text
    threshold = majority(hospitals)
    return f"{text.rstrip()}\n\n[secagg]\nenabled = true\nthreshold = {threshold}\nassumed_honest = {threshold}\n"


__all__ = ["SecAggPolicy", "majority", "parse_secagg_policy", "with_secagg_table"]
