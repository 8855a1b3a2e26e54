"""`summary.json`: the output contract of a run, read by tests and other tools. Every egress
figure comes from the hospitals' ledgers through the one typed reader (`gate.entries`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgate.executor.progress import METRICS_FILE, read_rounds
from fedgate.gate.entries import ReplyEntry, finite_or_none, read_entries
from fedgate.gate.pipeline import LEDGER_DIR
from fedgate.ledger.store import Ledger
from fedgate.secagg.records import secagg_summary


def hospital_egress(hospital_dir: Path, run_id: int) -> dict[str, Any]:
    """One hospital's figures for one run (its ledger spans every run it took part in)."""
    replies: list[ReplyEntry] = []
    if (hospital_dir / LEDGER_DIR / "ledger.sqlite").is_file():
        with Ledger(hospital_dir / LEDGER_DIR, create=False) as ledger:
            replies = [e for e in read_entries(ledger) if isinstance(e, ReplyEntry) and e.run_id == run_id]
    sent = [r for r in replies if r.sent]
    refused = [r for r in replies if not r.sent]
    train = [r.bits for r in sent if r.category == "train"]
    modes = sorted({r.isolation_mode for r in replies})
    enforced = bool(replies) and all(r.isolation_enforced for r in replies)
    return {
        "replies_sent": len(sent),
        "replies_refused": len(refused),
        "bits_per_reply": finite_or_none(max(train)) if train else None,
        "bits_total": finite_or_none(sum(r.bits for r in replies)),
        "bits_cumulative": finite_or_none(replies[-1].cumulative_bits) if replies else None,
        "refusals": [
            {"seq": r.seq, "round": r.gate_round, "server_round": r.server_round, "rule": r.rule} for r in refused
        ],
        "isolation": {"modes": modes, "enforced": enforced},
    }


def build_summary(
    run_id: int,
    hospitals: int,
    rounds: int,
    seconds: float,
    per_round: list[dict[str, Any]],
    hospital_dirs: list[Path],
    policy_hash: str,
) -> dict[str, Any]:
    last = per_round[-1] if per_round else {}
    egress = {d.name: hospital_egress(d, run_id) for d in hospital_dirs}
    return {
        "run_id": run_id,
        "hospitals": hospitals,
        "rounds": rounds,
        "final_accuracy": last.get("accuracy"),
        "final_auc": last.get("auc"),
        "seconds": round(seconds, 2),
        "per_round": per_round,
        "hospitals_dirs": [str(d) for d in hospital_dirs],
        "policy_hash": policy_hash,
        "egress": egress,
        "isolation": {name: e["isolation"] for name, e in egress.items()},
        "bits_per_reply": {name: e["bits_per_reply"] for name, e in egress.items()},
        "bits_total": {name: e["bits_total"] for name, e in egress.items()},
        "refusals": {name: e["refusals"] for name, e in egress.items() if e["refusals"]},
        "secagg": secagg_summary(hospital_dirs, run_id),
    }


def write_summary(
    out_dir: Path, run_dir: Path, run_id: int, hospitals: int, rounds: int, seconds: float, policy_hash: str
) -> dict[str, Any]:
    """Build the summary of one run; write it into the run's folder and as OUT/summary.json."""
    per_round = read_rounds(run_dir / METRICS_FILE)
    hospital_dirs = [out_dir / f"hospital-{i}" for i in range(hospitals)]
    summary = build_summary(run_id, hospitals, rounds, seconds, per_round, hospital_dirs, policy_hash)
    text = json.dumps(summary, indent=2) + "\n"
    (run_dir / "summary.json").write_text(text)
    (out_dir / "summary.json").write_text(text)
    return summary
