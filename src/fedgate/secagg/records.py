"""The ledger entries of SecAgg+'s key stages, and the one reader the summary uses.

Setup, share-keys and unmask replies are the gate's own (no ClientApp runs): each is recorded
with its exact bytes before it leaves, like any reply, as a `secagg-reply` entry; a stage the
gate refuses is a `secagg-refused` entry. They carry no bits: their content is fresh randomness
and shares of it (public keys, encrypted shares, shares of seeds and keys), chosen by nothing
the hospital's data touches, and released as soon as the server asks. The masked vector is the
reply of the collect stage: a `reply-sent` entry, with the bound for the sum and its assumption
in its `secagg` stage evidence."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgate.gate.entries import OtherEntry, ReplyEntry, read_entries
from fedgate.gate.pipeline import LEDGER_DIR
from fedgate.ledger.store import Ledger

KIND_SECAGG_REPLY = "secagg-reply"
KIND_SECAGG_REFUSED = "secagg-refused"
SECAGG_STAGE = "secagg"
"""The name of the stage evidence a masked reply carries (in its decision's stages)."""


@dataclass(frozen=True)
class SecAggEntry:
    seq: int
    run_id: int
    hospital: str
    stage: str
    sent: bool
    node_id: int
    group_id: str
    rule: str
    reason: str
    evidence: dict[str, Any]


def parse_secagg(entry: OtherEntry) -> SecAggEntry | None:
    if entry.kind not in (KIND_SECAGG_REPLY, KIND_SECAGG_REFUSED):
        return None
    raw = entry.fields
    return SecAggEntry(
        seq=entry.seq,
        run_id=int(raw["run_id"]),
        hospital=str(raw["hospital"]),
        stage=str(raw["stage"]),
        sent=entry.kind == KIND_SECAGG_REPLY,
        node_id=int(raw["node_id"]),
        group_id=str(dict(raw["instruction"])["group_id"]),
        rule=str(raw.get("rule", "")),
        reason=str(raw.get("reason", "")),
        evidence=dict(raw.get("evidence", {})),
    )


def masked_round(entry: ReplyEntry) -> dict[str, Any] | None:
    """The `secagg` evidence of a reply that left as a masked vector (None for any other reply)."""
    for stage in entry.decision.get("stages", []):
        if stage.get("stage") == SECAGG_STAGE:
            return dict(stage.get("detail", {}))
    return None


def _read(hospital_dir: Path) -> list[Any]:
    if not (hospital_dir / LEDGER_DIR / "ledger.sqlite").is_file():
        return []
    with Ledger(hospital_dir / LEDGER_DIR, create=False) as ledger:
        return list(read_entries(ledger))


def secagg_summary(hospital_dirs: Iterable[Path], run_id: int) -> dict[str, Any]:
    """summary.json's `secagg`: whether the run used it, its shares and threshold (as the server's
    setup messages set them), and which hospitals dropped out of a sum: named dropped by a
    survivor's unmask request, or a hospital that took a round's keys but sent no masked vector."""
    nodes: dict[int, str] = {}
    shares: set[int] = set()
    thresholds: set[int] = set()
    dead: set[int] = set()
    dropped: set[str] = set()
    for folder in hospital_dirs:
        entries = _read(Path(folder))
        rounds_set_up: set[str] = set()
        rounds_masked: set[str] = set()
        name = Path(folder).name
        for entry in entries:
            if isinstance(entry, OtherEntry) and (parsed := parse_secagg(entry)) and parsed.run_id == run_id:
                nodes.setdefault(parsed.node_id, parsed.hospital)
                name = parsed.hospital
                if parsed.stage == "setup" and parsed.sent:
                    rounds_set_up.add(parsed.group_id)
                    shares.add(int(parsed.evidence.get("share_num", 0)))
                    thresholds.add(int(parsed.evidence.get("threshold", 0)))
                if parsed.stage == "unmask" and parsed.sent:
                    dead.update(int(n) for n in parsed.evidence.get("dead", []))
            elif isinstance(entry, ReplyEntry) and entry.run_id == run_id and entry.sent and masked_round(entry):
                rounds_masked.add(entry.group_id)
        if rounds_set_up - rounds_masked:
            dropped.add(name)
    dropped.update(nodes[n] for n in dead if n in nodes)
    return {
        "enabled": bool(nodes),
        "num_shares": max(shares) if shares else 0,
        "threshold": min(thresholds) if thresholds else 0,
        "dropped": sorted(dropped),
    }


__all__ = ["KIND_SECAGG_REFUSED", "KIND_SECAGG_REPLY", "SECAGG_STAGE", "SecAggEntry", "masked_round",
           "parse_secagg", "secagg_summary"]  # fmt: skip
