"""What each gate stage decided and why, as frozen records that serialise to canonical JSON
(they are hashed into the ledger)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedgate.canonical import decimal_str


@dataclass(frozen=True)
class StageEvidence:
    stage: str
    passed: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class Bound:
    """Bits one reply can carry, whatever the ClientApp does: the noised update's channel
    capacity, each metric's log2(levels), one bit for whether it was sent at all, and
    log2(slots) for when it was released. A refused reply still carries the last two."""

    update_bits: float = 0.0
    metric_bits: float = 0.0
    decision_bits: float = 1.0
    timing_bits: float = 0.0

    @property
    def total(self) -> float:
        return self.update_bits + self.metric_bits + self.decision_bits + self.timing_bits

    def refused(self) -> Bound:
        """What a refusal of this reply still carries: sent-or-not, and when."""
        return Bound(0.0, 0.0, self.decision_bits, self.timing_bits)

    def to_json(self) -> dict[str, Any]:
        return {
            "update_bits": decimal_str(self.update_bits),
            "metric_bits": decimal_str(self.metric_bits),
            "decision_bits": decimal_str(self.decision_bits),
            "timing_bits": decimal_str(self.timing_bits),
            "total_bits": decimal_str(self.total),
        }


@dataclass(frozen=True)
class GateDecision:
    """The verdict on one reply. `reason` and `detail` stay at the hospital; the server gets
    only a generic refusal."""

    sent: bool
    message_type: str
    stages: tuple[StageEvidence, ...]
    bound: Bound
    manifest_hash: str = ""
    rule: str = ""
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "message_type": self.message_type,
            "stages": [s.to_json() for s in self.stages],
            "bound": self.bound.to_json(),
            "manifest_hash": self.manifest_hash,
            "rule": self.rule,
            "reason": self.reason,
            "detail": self.detail,
            "warnings": list(self.warnings),
        }
