"""The hospital's `[fab]` policy table: which FABs it has approved and how large one may be.

Defaults are Flower's own publishing limits (flwr.supercore.constant, flwr.common.constant), so a
FAB that `flwr build` accepts and Flower's app hub would publish passes them unchanged."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedgate.errors import PolicyError
from fedgate.fab.flower_rules import FAB_MAX_SIZE, MAX_FILE_BYTES, MAX_FILE_COUNT, MAX_TOTAL_BYTES

FAB_REF = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
# Members smaller than this are never ratio-checked: a bomb needs volume, and short files of
# repeated characters (a banner comment, an empty __init__.py) compress well for honest reasons.
RATIO_FLOOR_BYTES = 64 * 1024
# Hard ceilings on what a policy may allow: the check holds a whole FAB in memory.
_CEILING_BYTES = 1024 * 1024 * 1024
_CEILING_FILES = 100_000


@dataclass(frozen=True)
class FabPolicy:
    approved: tuple[str, ...] = ()  # "sha256:<64 hex>"; empty: any FAB that passes the check
    max_files: int = MAX_FILE_COUNT
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_file_bytes: int = MAX_FILE_BYTES
    max_ratio: int = 100
    max_fab_bytes: int = FAB_MAX_SIZE

    def approval(self, sha256: str) -> str:
        """'no-list' when the policy approves nothing in particular, else 'approved'/'not-approved'."""
        if not self.approved:
            return "no-list"
        return "approved" if f"sha256:{sha256}" in self.approved else "not-approved"

    def to_json(self) -> dict[str, Any]:
        return {
            "approved": list(self.approved),
            "max_fab_bytes": self.max_fab_bytes,
            "max_file_bytes": self.max_file_bytes,
            "max_files": self.max_files,
            "max_ratio": self.max_ratio,
            "max_total_bytes": self.max_total_bytes,
        }


_LIMITS = {
    "max_files": (1, _CEILING_FILES),
    "max_total_bytes": (1, _CEILING_BYTES),
    "max_file_bytes": (1, _CEILING_BYTES),
    "max_ratio": (1, 1_000_000),
    "max_fab_bytes": (1, _CEILING_BYTES),
}


def parse_fab_policy(table: dict[str, Any]) -> FabPolicy:
    """The `[fab]` table of a policy file (already parsed TOML) as a FabPolicy; errors name the key."""
    if not isinstance(table, dict):
        raise PolicyError("[fab] must be a table")
    unknown = sorted(set(table) - {"approved", *_LIMITS})
    if unknown:
        raise PolicyError(f"unknown key(s) in [fab]: {', '.join(unknown)}; expected approved, {', '.join(_LIMITS)}")

    raw = table.get("approved", [])
    if not isinstance(raw, list):
        raise PolicyError(f'fab.approved: must be a list of "sha256:<64 hex digits>", got {raw!r}')
    approved: list[str] = []
    for index, ref in enumerate(raw):
        if not isinstance(ref, str) or not FAB_REF.fullmatch(ref):
            raise PolicyError(
                f'fab.approved[{index}]: must be "sha256:" and 64 lower-case hex digits, as '
                f"`fedgate fab check` prints it; got {ref!r}"
            )
        if ref not in approved:
            approved.append(ref)

    limits: dict[str, int] = {}
    for key, (low, high) in _LIMITS.items():
        value = table.get(key, getattr(FabPolicy, key))
        if not isinstance(value, int) or isinstance(value, bool):
            raise PolicyError(f"fab.{key}: must be an integer, got {value!r}")
        if not low <= value <= high:
            raise PolicyError(f"fab.{key}: must be between {low} and {high:,}, got {value}")
        limits[key] = value
    return FabPolicy(approved=tuple(approved), **limits)
