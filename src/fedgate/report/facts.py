"""What the report says, read from a ledger: pure data, no HTML and no plots."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.flower_adapter import recorddict_from_bytes
from fedgate.gate.entries import KIND_REVIEW, Entry, PolicyEntry, ReplyEntry, ReviewEntry, read_entries
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger


@dataclass
class ReplyRow:
    seq: int
    time: str
    run_id: int
    round: int
    message_type: str
    sent: bool
    bytes: int
    bits: float
    cumulative_bits: float
    rule: str
    destination: str
    warnings: list[str]


@dataclass
class ReportFacts:
    ledger_path: str
    verified: bool
    verification: str
    hospital: str = ""
    replies: list[ReplyRow] = field(default_factory=list)
    reviews: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    tensor_names: list[str] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    manifest_hashes: list[str] = field(default_factory=list)
    stored_bytes: int = 0

    @property
    def sent(self) -> list[ReplyRow]:
        return [r for r in self.replies if r.sent]

    @property
    def refused(self) -> list[ReplyRow]:
        return [r for r in self.replies if not r.sent]

    @property
    def destinations(self) -> list[str]:
        return sorted({r.destination for r in self.sent})

    @property
    def refusal_rules(self) -> dict[str, int]:
        return dict(Counter(r.rule for r in self.refused))

    @property
    def review_counts(self) -> dict[str, int]:
        return dict(Counter(r["status"] for r in self.reviews))

    @property
    def max_bits_per_reply(self) -> float:
        return max((r.bits for r in self.sent), default=0.0)

    @property
    def total_bits(self) -> float:
        return sum(r.bits for r in self.sent)


def read_facts(ledger_folder: Path) -> ReportFacts:
    """Verify first, then read. A ledger that does not verify is still reported, as such."""
    ledger_folder = Path(ledger_folder)
    if (ledger_folder / "ledger" / "ledger.sqlite").is_file():
        ledger_folder = ledger_folder / "ledger"
    try:
        result = verify_ledger(ledger_folder)
        facts = ReportFacts(
            str(ledger_folder),
            True,
            f"verified: {result.entries} entries, {result.tree_heads} signed tree heads, "
            f"root {result.root}, signing key {result.key_id}",
        )
    except LedgerVerificationError as err:
        where = f" (first broken entry: {err.seq})" if err.seq is not None else ""
        facts = ReportFacts(str(ledger_folder), False, f"{err}{where}")
    with Ledger(ledger_folder, create=False) as ledger:
        entries = read_entries(ledger)
        facts.tensor_names = _tensor_names(ledger, entries)
    metrics: set[str] = set()
    manifests: set[str] = set()
    for entry in entries:
        if isinstance(entry, PolicyEntry):
            facts.hospital = facts.hospital or entry.hospital
            facts.policies.append({"policy": entry.policy, "policy_hash": entry.policy_hash, "run_id": entry.run_id})
        elif isinstance(entry, ReviewEntry) and entry.kind == KIND_REVIEW:
            facts.reviews.append({"seq": entry.seq, "round": "", "status": entry.status, "reviewer": entry.reviewer,
                                  "reason": entry.reason, "decided_at": entry.time})  # fmt: skip
        elif isinstance(entry, ReplyEntry):
            facts.hospital = facts.hospital or entry.hospital
            facts.stored_bytes += entry.payload_size
            facts.replies.append(
                ReplyRow(
                    seq=entry.seq,
                    time=entry.time,
                    run_id=entry.run_id,
                    round=entry.gate_round,
                    message_type=entry.category,
                    sent=entry.sent,
                    bytes=entry.payload_size if entry.sent else 0,
                    bits=entry.bits,
                    cumulative_bits=entry.cumulative_bits,
                    rule=entry.rule,
                    destination=entry.destination,
                    warnings=list(entry.warnings),
                )
            )
            if entry.sent:
                for stage in entry.decision.get("stages", []):
                    if stage.get("stage") == "metrics":
                        metrics.update(stage.get("detail", {}).get("metrics", {}))
                if entry.manifest_hash:
                    manifests.add(entry.manifest_hash)
    facts.metric_names = sorted(metrics)
    facts.manifest_hashes = sorted(manifests)
    return facts


def _tensor_names(ledger: Ledger, entries: list[Entry]) -> list[str]:
    """The tensor names of the model that left, read from the last payload sent."""
    for entry in reversed(entries):
        if isinstance(entry, ReplyEntry) and entry.sent and entry.category == "train":
            try:
                content = recorddict_from_bytes(ledger.blobs.get(entry.payload_sha256))
            except (LedgerError, ValueError, KeyError):
                return []  # a missing or altered blob: the verification line already says so
            return [name for record in content.array_records.values() for name in record]
    return []
