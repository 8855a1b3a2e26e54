"""The gate's differential-privacy accounting: what each sent reply costs, in ε, per patient
and for the hospital as a whole, across every round and every run.

Which mechanism a reply is (decided by the hospital's code, never by the reply):
- every sent train reply carries the gate's own noise on the clipped update: a Gaussian
  mechanism with z = σ / (effective norm), the same z the bits bound uses
  (bits = 1/(2z² ln 2) = ρ/ln 2). Hospital level: sensitivity C. Per patient, for a *gated*
  reply the ClientApp may move its update anywhere in the ball, so it counts at 2C;
- a *trusted* reply is the output of the hospital's own DP-SGD (the `DpSgdEvent` planned from
  the recipe and the dataset's size), with the gate's noise on top (post-processing): per
  patient it counts as that DP-SGD event only.

All of a hospital's data is one history (conservative: a patient in any of its datasets is
covered by the composition of everything), kept as merged events in the gate's signed state.
The plan is made at admission, before any code runs, so a `[privacy] max_epsilon` refuses a
round that would pass it; the ledger entry of a sent reply records the round's ε and the new
cumulative ε with δ and the accountant."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from fedgate.errors import GateRefusal
from fedgate.gate.manifest import Manifest
from fedgate.gate.rules import update_bits_for
from fedgate.policy import Policy
from fedgate.privacy import (
    DpSgdEvent,
    EpsilonStatement,
    PrivacyEvent,
    UpdateNoiseEvent,
    event_from_json,
    hospital_level,
    merge,
    record_level,
)

GATED, TRUSTED = "gated", "trusted"


def gate_noise_multiplier(policy: Policy, manifest: Manifest, honest_in_sum: int = 1) -> float:
    """z of the gate's noise on this model's update: σ over the largest norm the released
    update can have (clip norm plus grid rounding). 0 without noise (no guarantee).
    `honest_in_sum`: the update reaches the server only inside a SecAgg+ sum assumed to hold at
    least that many honestly noised replies (σ·sqrt(t) in the sum: `rules.update_bits_for`)."""
    bits = update_bits_for(policy.clip_norm, policy.sigma, manifest.float_coordinates, honest_in_sum)
    if math.isinf(bits):
        return 0.0
    return 1.0 / math.sqrt(2.0 * bits * math.log(2.0))


@dataclass(frozen=True)
class PrivacyHistory:
    """Merged events of everything this hospital has sent, per level (record, hospital)."""

    record: tuple[PrivacyEvent, ...] = ()
    hospital: tuple[PrivacyEvent, ...] = ()

    def plus(self, record: tuple[PrivacyEvent, ...], hospital: tuple[PrivacyEvent, ...]) -> PrivacyHistory:
        return PrivacyHistory(merge([*self.record, *record]), merge([*self.hospital, *hospital]))

    def to_json(self) -> dict[str, Any]:
        return {"record": [e.to_json() for e in self.record], "hospital": [e.to_json() for e in self.hospital]}

    @classmethod
    def from_json(cls, data: Any) -> PrivacyHistory:
        if not data:
            return cls()
        return cls(
            tuple(event_from_json(e) for e in data["record"]), tuple(event_from_json(e) for e in data["hospital"])
        )


@functools.lru_cache(maxsize=256)
def _record(events: tuple[PrivacyEvent, ...], delta: float) -> EpsilonStatement:
    return record_level(events, delta)


@functools.lru_cache(maxsize=256)
def _hospital(events: tuple[PrivacyEvent, ...], delta: float) -> EpsilonStatement:
    return hospital_level([e for e in events if isinstance(e, UpdateNoiseEvent)], delta)


def _figure(statement: EpsilonStatement) -> dict[str, Any]:
    return {
        "epsilon": repr(statement.epsilon),
        "accountant": statement.accountant,
        "alongside": {name: repr(value) for name, value in statement.alongside},
    }


@dataclass(frozen=True)
class PrivacyPlan:
    """What sending this reply costs: its events, and the round's and the cumulative ε at both
    levels (cumulative = the history plus this reply), computed before the app runs."""

    mode: str
    delta: float
    record: tuple[PrivacyEvent, ...]
    hospital: tuple[PrivacyEvent, ...]
    round_record: EpsilonStatement
    round_hospital: EpsilonStatement
    cumulative_record: EpsilonStatement
    cumulative_hospital: EpsilonStatement
    max_epsilon: float | None
    level: str

    def to_json(self) -> dict[str, Any]:
        """The ledger entry's `privacy` field (floats as exact decimal strings)."""
        return {
            "mode": self.mode,
            "delta": repr(self.delta),
            "record_level": {
                "round": _figure(self.round_record),
                "cumulative": _figure(self.cumulative_record),
                "events": [e.to_json() for e in self.record],
                "neighbouring": self.round_record.neighbouring,
            },
            "hospital_level": {
                "round": _figure(self.round_hospital),
                "cumulative": _figure(self.cumulative_hospital),
                "events": [e.to_json() for e in self.hospital],
                "neighbouring": self.round_hospital.neighbouring,
            },
            "budget": {
                "max_epsilon": None if self.max_epsilon is None else repr(self.max_epsilon),
                "level": self.level,
            },
            "library": self.round_record.library,
        }


def plan(
    policy: Policy,
    history: PrivacyHistory,
    manifest: Manifest | None,
    dp_sgd: DpSgdEvent | None,
    honest_in_sum: int = 1,
) -> PrivacyPlan | None:
    """The plan for one reply, or None when it releases no update (an evaluate reply: its
    metrics are bounded in bits, not in ε). Raises GateRefusal("privacy.max_epsilon") when
    the budget would be passed."""
    if manifest is None:
        return None
    z = gate_noise_multiplier(policy, manifest, honest_in_sum)
    hospital: tuple[PrivacyEvent, ...] = (UpdateNoiseEvent(z),)
    record: tuple[PrivacyEvent, ...] = (dp_sgd,) if dp_sgd is not None else hospital
    delta = policy.privacy.delta
    after = history.plus(record, hospital)
    result = PrivacyPlan(
        mode=TRUSTED if dp_sgd is not None else GATED,
        delta=delta,
        record=record,
        hospital=hospital,
        round_record=_record(merge(record), delta),
        round_hospital=_hospital(merge(hospital), delta),
        cumulative_record=_record(after.record, delta),
        cumulative_hospital=_hospital(after.hospital, delta),
        max_epsilon=policy.privacy.max_epsilon,
        level=policy.privacy.level,
    )
    limit = policy.privacy.max_epsilon
    if limit is not None:
        spent = result.cumulative_record if result.level == "record" else result.cumulative_hospital
        before = _record(history.record, delta) if result.level == "record" else _hospital(history.hospital, delta)
        if not spent.epsilon <= limit:
            words = "per patient" if result.level == "record" else "for the hospital"
            raise GateRefusal(
                "privacy.max_epsilon",
                f"this round would take the cumulative ε {words} from {before.epsilon:.4g} to {spent.epsilon:.4g} "
                f"(δ = {delta:g}, {spent.accountant}), over the policy's {limit:g}",
                mode=result.mode,
                before=repr(before.epsilon),
                after=repr(spent.epsilon),
                limit=repr(limit),
            )
    return result


def cumulative(history: PrivacyHistory, delta: float) -> tuple[EpsilonStatement, EpsilonStatement]:
    """(record-level, hospital-level) ε of everything the hospital has sent."""
    return _record(history.record, delta), _hospital(history.hospital, delta)
