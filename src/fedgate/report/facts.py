"""What the report says, read from a ledger: pure data, no HTML and no plots.

Every figure comes from the ledger's entries through the one typed reader (`gate.entries`),
grouped by run. The ledger is verified first, against the key the reader pins; only the
entries its latest signed head covers are reported."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgate.audit.wording import AuditWords, audit_words
from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.flower_adapter import recorddict_from_bytes
from fedgate.gate.entries import KIND_REVIEW, Entry, OtherEntry, PolicyEntry, ReplyEntry, ReviewEntry, read_entries
from fedgate.ledger.signing import PUBLIC_KEY_FILE, Verifier, parse_fingerprint
from fedgate.ledger.store import DB_FILE, Ledger, SignedTreeHead
from fedgate.ledger.verify import verify_ledger
from fedgate.report.privacy import PrivacyFacts, privacy_facts
from fedgate.secagg.records import masked_round

LEDGER_DIR = "ledger"

# How a reply's ClientApp was isolated, in the report's words.
SANDBOX = "sandbox enforced"
NO_ISOLATION = "no isolation"
DOWNGRADED = "sandbox downgraded"
NOT_RUN = "ClientApp not run"  # refused before it ran, or its sandbox refused to start
TRUSTED = "trusted trainer"  # no research-team code ran
UNRECORDED = "isolation not recorded"
ISOLATED = frozenset({SANDBOX, NOT_RUN, TRUSTED})
RULES_BEFORE_THE_APP = ("sandbox-refused", "fab-")


def isolation_of(reply: ReplyEntry) -> str:
    """A reply's isolation as the ledger records it. A sandbox that was not enforced yet
    produced or attempted a reply was running downgraded (the sandbox runs the app with
    missing layers only when the policy allows a downgrade)."""
    mode = reply.isolation_mode
    if mode == "downgraded":
        return DOWNGRADED
    if mode == "no-isolation":
        return NO_ISOLATION
    if mode == "trusted":
        return TRUSTED
    if mode == "sandbox":
        if reply.isolation_enforced:
            return SANDBOX
        if not reply.sent and reply.rule.startswith(RULES_BEFORE_THE_APP):
            return NOT_RUN
        return DOWNGRADED
    if mode == "none" and reply.isolation_enforced:
        return NOT_RUN
    return UNRECORDED


@dataclass(frozen=True)
class ReplyRow:
    seq: int
    time: str
    run_id: int
    gate_round: int
    server_round: str
    category: str
    sent: bool
    payload_size: int  # sent: bytes that left; refused: bytes kept at the hospital
    bits: float  # counted against the budget: the bound if sent, decision + timing if refused
    update_bits: float
    cumulative_bits: float  # the hospital's, over every run
    rule: str
    reason: str
    destination: str
    warnings: tuple[str, ...]
    isolation: str
    audit: AuditWords | None = None  # the gate's leakage audit of this reply, if it ran
    secagg: dict[str, Any] | None = None  # a reply that left masked (SecAgg+): its `secagg` stage evidence

    @property
    def isolated(self) -> bool:
        return self.isolation in ISOLATED


@dataclass(frozen=True)
class ReviewRow:
    seq: int
    time: str
    instruction_id: str
    status: str
    reviewer: str
    reason: str
    payload_sha256: str  # the bytes the person decided on


@dataclass(frozen=True)
class PolicyRow:
    seq: int
    policy_hash: str
    policy: dict[str, Any]

    def setting(self, section: str, key: str) -> str:
        value = self.policy.get(section, {})
        return str(value.get(key, "?")) if isinstance(value, dict) else "?"

    @property
    def noise_multiplier(self) -> str:
        return self.setting("update", "noise_multiplier")

    @property
    def unbounded(self) -> bool:
        try:
            return float(self.noise_multiplier) == 0.0
        except ValueError:
            return False


@dataclass(frozen=True)
class RunFacts:
    run_id: int
    first_time: str
    last_time: str
    policies: tuple[PolicyRow, ...]
    replies: tuple[ReplyRow, ...]
    reviews: tuple[ReviewRow, ...]
    tensor_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    manifest_hashes: tuple[str, ...]

    @property
    def sent(self) -> tuple[ReplyRow, ...]:
        return tuple(r for r in self.replies if r.sent)

    @property
    def refused(self) -> tuple[ReplyRow, ...]:
        return tuple(r for r in self.replies if not r.sent)

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(sorted({r.destination for r in self.replies}))

    @property
    def sent_bytes(self) -> int:
        return sum(r.payload_size for r in self.sent)

    @property
    def kept_bytes(self) -> int:
        return sum(r.payload_size for r in self.refused)

    @property
    def max_bits_per_reply(self) -> float:
        return max((r.bits for r in self.replies), default=0.0)

    @property
    def total_bits(self) -> float:
        return sum(r.bits for r in self.replies)

    @property
    def unbounded(self) -> bool:
        """The policy adds no noise (z = 0): a sent update's bound is infinite."""
        return any(p.unbounded for p in self.policies) or any(math.isinf(r.update_bits) for r in self.replies)

    @property
    def unbounded_sent(self) -> int:
        return sum(1 for r in self.sent if math.isinf(r.bits))

    @property
    def isolation_counts(self) -> dict[str, int]:
        return dict(Counter(r.isolation for r in self.replies))

    @property
    def not_isolated(self) -> tuple[ReplyRow, ...]:
        return tuple(r for r in self.replies if not r.isolated)

    @property
    def downgraded(self) -> tuple[ReplyRow, ...]:
        return tuple(r for r in self.replies if r.isolation == DOWNGRADED)

    @property
    def masked(self) -> tuple[ReplyRow, ...]:
        """Sent replies that left as a masked vector (SecAgg+): the server saw only their sum."""
        return tuple(r for r in self.sent if r.secagg is not None)

    @property
    def refusal_rules(self) -> dict[str, int]:
        return dict(Counter(r.rule for r in self.refused))

    @property
    def review_counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.reviews))

    @property
    def policy_hashes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.policy_hash for p in self.policies))


@dataclass(frozen=True)
class Verification:
    verified: bool
    message: str
    pinned: bool  # checked against a key the reader gave (file or fingerprint), not the one beside the ledger
    fingerprint: str  # of the key the ledger was checked with (or, unverified, the key found for it)
    latest_head: dict[str, Any] | None = None  # to keep, as the next `--trusted-head`
    first_broken: int | None = None
    entries: int = 0
    trusted_head_checked: bool = False

    @property
    def latest_head_json(self) -> str:
        return json.dumps(self.latest_head, indent=2) if self.latest_head is not None else ""


@dataclass(frozen=True)
class ReportFacts:
    ledger_path: str
    hospital: str
    verification: Verification
    runs: tuple[RunFacts, ...] = ()
    cumulative_bits: float = 0.0  # the hospital's total over every reply in this ledger
    stored_bytes: int = 0
    other_events: tuple[tuple[int, str, str], ...] = ()  # (seq, time, kind) of entries outside any run
    unread: str = ""  # why the entries could not be read, if they could not
    not_covered: int = 0  # entries appended after the verified head: not reported
    # The enforced ε (and any claimed one) as of the last reply that left; None: nothing accounted left.
    privacy: PrivacyFacts | None = None

    @property
    def replies(self) -> tuple[ReplyRow, ...]:
        return tuple(r for run in self.runs for r in run.replies)

    @property
    def sent(self) -> tuple[ReplyRow, ...]:
        return tuple(r for r in self.replies if r.sent)

    @property
    def refused(self) -> tuple[ReplyRow, ...]:
        return tuple(r for r in self.replies if not r.sent)

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(sorted({d for run in self.runs for d in run.destinations}))

    @property
    def reviews(self) -> tuple[ReviewRow, ...]:
        return tuple(v for run in self.runs for v in run.reviews)


def ledger_folder_of(path: Path) -> Path:
    """A hospital folder or its ledger folder."""
    path = Path(path)
    return path / LEDGER_DIR if (path / LEDGER_DIR / DB_FILE).is_file() else path


def read_facts(
    ledger_folder: Path,
    *,
    public_key: Path | bytes | None = None,
    fingerprint: str | None = None,
    trusted_head: SignedTreeHead | None = None,
) -> ReportFacts:
    """Verify first (against `public_key` / `fingerprint` when given), then read. A ledger that
    does not verify is still reported, as such. LedgerError for the caller's own input (no
    ledger there, an unreadable key file, a malformed fingerprint)."""
    folder = ledger_folder_of(ledger_folder)
    verification = _verify(folder, public_key, fingerprint, trusted_head)
    try:
        with Ledger(folder, create=False) as ledger:
            entries = read_entries(ledger)
            if verification.verified:
                covered = [e for e in entries if e.seq < verification.entries]
                not_covered, entries = len(entries) - len(covered), covered
            else:
                not_covered = 0
            runs = tuple(_runs(ledger, entries))
    except LedgerError as err:
        return ReportFacts(str(folder), "", verification, unread=str(err))
    hospital = next((e.hospital for e in entries if isinstance(e, PolicyEntry | ReplyEntry)), "")
    replies = [e for e in entries if isinstance(e, ReplyEntry)]
    others = tuple((e.seq, e.time, e.kind) for e in entries if isinstance(e, OtherEntry))
    return ReportFacts(
        ledger_path=str(folder),
        hospital=hospital,
        verification=verification,
        runs=runs,
        cumulative_bits=replies[-1].cumulative_bits if replies else 0.0,
        stored_bytes=sum(r.payload_size for r in replies),
        other_events=others,
        not_covered=not_covered,
        privacy=privacy_facts(replies),
    )


def _verify(
    folder: Path, public_key: Path | bytes | None, fingerprint: str | None, trusted_head: SignedTreeHead | None
) -> Verification:
    if fingerprint is not None:
        fingerprint = parse_fingerprint(fingerprint)  # a typo is the caller's error, not a tampered ledger
    pinned = public_key is not None or fingerprint is not None
    try:
        result = verify_ledger(folder, public_key, trusted_head, pinned_fingerprint=fingerprint)
    except LedgerVerificationError as err:
        return Verification(False, str(err), pinned, _key_found(folder, public_key) or fingerprint or "", None, err.seq)
    message = f"verified: {result.entries:,} entries, {result.tree_heads:,} signed tree heads, root {result.root}" + (
        ", and it still contains the trusted head given" if trusted_head is not None else ""
    )
    return Verification(
        True, message, result.pinned, result.key_id, result.latest_head.to_json(), None, result.entries,
        trusted_head is not None,
    )  # fmt: skip


def _key_found(folder: Path, public_key: Path | bytes | None) -> str:
    """The fingerprint of the key given, or of the one beside the ledger (for an unverified report)."""
    try:
        if public_key is not None:
            pem = public_key if isinstance(public_key, bytes) else Path(public_key).read_bytes()
        else:
            pem = (folder / PUBLIC_KEY_FILE).read_bytes()
        return Verifier.from_pem(pem).key_id
    except (OSError, LedgerError):
        return ""


def _runs(ledger: Ledger, entries: list[Entry]) -> list[RunFacts]:
    by_run: dict[int, list[Entry]] = {}
    for entry in entries:
        if isinstance(entry, PolicyEntry | ReplyEntry | ReviewEntry):
            by_run.setdefault(entry.run_id, []).append(entry)
    return [_run(ledger, run_id, group) for run_id, group in by_run.items()]


def _run(ledger: Ledger, run_id: int, entries: list[Entry]) -> RunFacts:
    policies = tuple(PolicyRow(e.seq, e.policy_hash, e.policy) for e in entries if isinstance(e, PolicyEntry))
    replies = tuple(_reply_row(e) for e in entries if isinstance(e, ReplyEntry))
    reviews = tuple(
        ReviewRow(e.seq, e.time, e.instruction_id, e.status, e.reviewer, e.reason, e.payload_sha256)
        for e in entries
        if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW
    )
    sent = [e for e in entries if isinstance(e, ReplyEntry) and e.sent]
    metrics: set[str] = set()
    for reply in sent:
        for stage in reply.decision.get("stages", []):
            if isinstance(stage, dict) and stage.get("stage") == "metrics":
                metrics.update(dict(stage.get("detail", {})).get("metrics", {}))
    return RunFacts(
        run_id=run_id,
        first_time=entries[0].time,
        last_time=entries[-1].time,
        policies=policies,
        replies=replies,
        reviews=reviews,
        tensor_names=_tensor_names(ledger, sent),
        metric_names=tuple(sorted(metrics)),
        manifest_hashes=tuple(sorted({r.manifest_hash for r in sent if r.manifest_hash})),
    )


def _reply_row(entry: ReplyEntry) -> ReplyRow:
    return ReplyRow(
        seq=entry.seq,
        time=entry.time,
        run_id=entry.run_id,
        gate_round=entry.gate_round,
        server_round=entry.server_round,
        category=entry.category,
        sent=entry.sent,
        payload_size=entry.payload_size,
        bits=entry.bits,
        update_bits=entry.update_bits,
        cumulative_bits=entry.cumulative_bits,
        rule=entry.rule,
        reason=entry.reason,
        destination=entry.destination,
        warnings=entry.warnings,
        isolation=isolation_of(entry),
        audit=audit_words(entry.decision),
        secagg=masked_round(entry) if entry.sent else None,
    )


def _tensor_names(ledger: Ledger, sent: list[ReplyEntry]) -> tuple[str, ...]:
    """The tensor names of the model that left in this run, read from its last update sent."""
    for entry in reversed(sent):
        if entry.category == "train" and entry.payload_sha256:
            try:
                content = recorddict_from_bytes(ledger.blobs.get(entry.payload_sha256))
            except (LedgerError, ValueError):
                return ()  # a missing or altered blob: the verification line already says so
            return tuple(name for record in content.array_records.values() for name in record)
    return ()


__all__ = ["ISOLATED", "PolicyRow", "ReplyRow", "ReportFacts", "ReviewRow", "RunFacts", "Verification", "read_facts"]
