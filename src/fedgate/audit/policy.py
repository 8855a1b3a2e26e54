"""The hospital's `[audit]` policy table: the leakage audit as a gate stage (off by default).

    [audit]
    every_rounds = 0             # 0: off; N: audit gate round 1, 1 + N, 1 + 2N, ... (train replies)
    refuse_if = "reidentifiable" # or "never": only record the scores
    budget_s = 60                # hard cap on one audit's wall time
    steps = 400                  # attack steps (fewer when the budget cuts them; recorded)
    null_runs = 3
    candidates = 3000            # how many of the hospital's images to rank among (0: all)
    image_size = 64              # input size assumed for a zoo model whose manifest does not fix it
    dataset = ""                 # the images: a load_dataset spec; "" = [training].dataset, or in a
                                 # simulation the simulated hospital's own share
    keep_images = true           # keep the pictures (true | reconstruction | null) in HOSPITAL_DIR/audit/

Torch-free: the policy loads at start-up without the audit's libraries."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedgate.audit.defaults import DEFAULT_BUDGET_S, DEFAULT_NULL_RUNS, DEFAULT_STEPS
from fedgate.canonical import decimal_str
from fedgate.errors import PolicyError

REFUSE_IF = ("reidentifiable", "never")


@dataclass(frozen=True)
class AuditPolicy:
    every_rounds: int = 0
    refuse_if: str = "reidentifiable"
    budget_s: float = DEFAULT_BUDGET_S
    steps: int = DEFAULT_STEPS
    null_runs: int = DEFAULT_NULL_RUNS
    candidates: int = 3000
    image_size: int = 64
    dataset: str = ""
    keep_images: bool = True

    @property
    def enabled(self) -> bool:
        return self.every_rounds > 0

    @property
    def refuses(self) -> bool:
        """True when a re-identifiable verdict, or an audit that could not give one, is a refusal."""
        return self.refuse_if == "reidentifiable"

    def audits(self, gate_round: int) -> bool:
        """Whether the train reply of this gate round (the gate's own count, from 1) is audited:
        the first, then every `every_rounds`-th."""
        return self.enabled and gate_round >= 1 and (gate_round - 1) % self.every_rounds == 0

    def reserve_s(self) -> float:
        """Time a task must leave the gate for the audit before the last release slot."""
        return self.budget_s if self.enabled else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "every_rounds": self.every_rounds,
            "refuse_if": self.refuse_if,
            "budget_s": decimal_str(self.budget_s),
            "steps": self.steps,
            "null_runs": self.null_runs,
            "candidates": self.candidates,
            "image_size": self.image_size,
            "dataset": self.dataset,
            "keep_images": self.keep_images,
        }

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> AuditPolicy:
        """Parse `[audit]`; errors are `PolicyError`s naming `audit.<key>`."""
        if not isinstance(table, Mapping):
            raise PolicyError("[audit] must be a table")
        known = cls.__dataclass_fields__
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise PolicyError(f"audit.{unknown[0]}: unknown key (known: {', '.join(known)})")
        values = {key: _parse(key, table.get(key, getattr(cls(), key))) for key in known}
        return cls(**values)


def _parse(key: str, value: Any) -> Any:
    where = f"audit.{key}"
    if key == "refuse_if":
        if value not in REFUSE_IF:
            raise PolicyError(f"{where} must be one of {', '.join(REFUSE_IF)}, got {value!r}")
        return value
    if key == "dataset":
        if not isinstance(value, str):
            raise PolicyError(f"{where} must be a dataset spec string (folder:DIR, dicom:DIR, npz:PATH, br35h)")
        return value
    if key == "keep_images":
        if not isinstance(value, bool):
            raise PolicyError(f"{where} must be true or false, got {value!r}")
        return value
    if key == "budget_s":
        if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
            raise PolicyError(f"{where} must be > 0 seconds, got {value!r}")
        return float(value)
    low = {"every_rounds": 0, "steps": 1, "null_runs": 1, "candidates": 0, "image_size": 8}[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PolicyError(f"{where} must be an integer >= {low}, got {value!r}")
    if key == "candidates" and 0 < value < 2:
        raise PolicyError(f"{where}: ranking needs at least 2 images (0: all of them)")
    return value
