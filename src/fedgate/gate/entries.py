"""The gate's ledger entries, typed: what the gate writes and the one reader that the gate,
summary.json and the DPO's report all use, so that they cannot disagree about what a field
means. Fields that are hashed are canonical JSON (floats as decimal strings)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from fedgate.errors import LedgerError
from fedgate.ledger.store import Ledger

KIND_POLICY = "policy"
KIND_SENT = "reply-sent"
KIND_REFUSED = "reply-refused"
KIND_REVIEW_HELD = "review-held"
KIND_REVIEW = "review-decision"
KIND_RESUME = "gate-resumed"
REPLY_KINDS = (KIND_SENT, KIND_REFUSED)


class EntryFormatError(LedgerError):
    """An entry of a known kind lacks a field or holds the wrong type (a bug or an edit)."""


def _float(text: Any) -> float:
    value = float(str(text))
    return value


@dataclass(frozen=True)
class PolicyEntry:
    seq: int
    time: str
    run_id: int
    hospital: str
    policy_hash: str
    policy: dict[str, Any]


@dataclass(frozen=True)
class ReplyEntry:
    seq: int
    time: str
    run_id: int
    hospital: str
    destination: str
    sent: bool
    category: str
    instruction_id: str
    message_type: str
    group_id: str
    server_round: str
    gate_round: int
    rule: str
    reason: str
    warnings: tuple[str, ...]
    bits: float  # what this reply counted against the budget (sent: its bound; refused: when + whether)
    update_bits: float
    metric_bits: float
    timing_bits: float
    cumulative_bits: float
    manifest_hash: str
    isolation_mode: str  # sandbox | downgraded | no-isolation | not-run (no app code ran) | trusted
    isolation_enforced: bool
    payload_sha256: str  # sent: the RecordDict bytes that left; refused: the reply Message bytes, kept here
    payload_size: int
    released_at: float
    decision: dict[str, Any] = field(repr=False)
    executor: dict[str, Any] = field(repr=False)
    privacy: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ReviewEntry:
    seq: int
    time: str
    kind: str  # review-held | review-decision
    run_id: int
    hospital: str
    instruction_id: str
    status: str
    reviewer: str
    reason: str
    payload_sha256: str
    instruction_sha256: str = ""


@dataclass(frozen=True)
class OtherEntry:
    seq: int
    time: str
    kind: str
    fields: dict[str, Any]


Entry = PolicyEntry | ReplyEntry | ReviewEntry | OtherEntry


def parse_entry(raw: dict[str, Any]) -> Entry:
    try:
        return _parse(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise EntryFormatError(f"ledger entry {raw.get('seq')} ({raw.get('kind')}) is malformed: {err!r}") from err


def _parse(raw: dict[str, Any]) -> Entry:
    kind = str(raw["kind"]) if "kind" in raw else ""
    seq, time = int(raw["seq"]), str(raw["time"])
    if kind == KIND_POLICY:
        return PolicyEntry(seq, time, int(raw["run_id"]), str(raw["hospital"]), str(raw["policy_hash"]), raw["policy"])
    if kind in REPLY_KINDS:
        decision = dict(raw["decision"])
        bound = dict(decision["bound"])
        payloads = dict(raw.get("payloads", {}))
        payload = dict(payloads.get("sent") or payloads.get("refused") or {})
        isolation = dict(raw.get("isolation", {}))
        instruction = dict(raw["instruction"])
        return ReplyEntry(
            seq=seq,
            time=time,
            run_id=int(raw["run_id"]),
            hospital=str(raw["hospital"]),
            destination=str(raw["destination"]),
            sent=kind == KIND_SENT,
            category=str(decision["message_type"]),
            instruction_id=str(instruction["message_id"]),
            message_type=str(instruction["message_type"]),
            group_id=str(instruction["group_id"]),
            server_round=str(instruction["server_round"]),
            gate_round=int(raw["gate_round"]),
            rule=str(decision["rule"]),
            reason=str(decision["reason"]),
            warnings=tuple(str(w) for w in decision["warnings"]),
            bits=_float(raw["bits"]),
            update_bits=_float(bound["update_bits"]),
            metric_bits=_float(bound["metric_bits"]),
            timing_bits=_float(bound["timing_bits"]),
            cumulative_bits=_float(raw["cumulative_bits"]),
            manifest_hash=str(decision["manifest_hash"]),
            isolation_mode=str(isolation.get("mode", "none")),
            isolation_enforced=bool(isolation.get("enforced", False)),
            payload_sha256=str(payload.get("sha256", "")),
            payload_size=int(payload.get("size", 0)),
            released_at=_float(dict(raw["release"])["at"]),
            decision=decision,
            executor=dict(raw.get("executor", {})),
            privacy=dict(raw.get("privacy") or {}),
        )
    if kind in (KIND_REVIEW_HELD, KIND_REVIEW):
        payloads = dict(raw.get("payloads", {}))
        held = str(dict(payloads.get("held", {})).get("sha256", raw.get("reviewed_sha256", "")))
        return ReviewEntry(
            seq,
            time,
            kind,
            int(raw["run_id"]),
            str(raw["hospital"]),
            str(raw["instruction_id"]),
            str(raw.get("status", "pending")),
            str(raw.get("reviewer", "")),
            str(raw.get("reason", "")),
            held,
            str(raw.get("instruction_sha256", "")),
        )
    return OtherEntry(seq, time, kind, raw)


def read_entries(ledger: Ledger) -> list[Entry]:
    return [parse_entry(entry) for entry in ledger.entries()]


def finite_or_none(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


CLAIMED_PRIVACY = re.compile(r"eps|epsilon|ε|delta|δ|privacy|dp[-_]", re.IGNORECASE)


def claimed_privacy(entry: ReplyEntry) -> dict[str, str]:
    """Metrics of a sent reply whose names claim a privacy figure (an `epsilon` the ClientApp
    reports, say): what the app *claims*, as the gate let it leave. Nothing enforces them; the
    summary, the review page and the report show them as claims, beside the enforced ε."""
    for stage in entry.decision.get("stages", []):
        if stage.get("stage") == "metrics":
            metrics = stage.get("detail", {}).get("metrics", {})
            return {
                name: str(value.get("sent"))
                for name, value in metrics.items()
                if CLAIMED_PRIVACY.search(name) and value.get("reported")
            }
    return {}
