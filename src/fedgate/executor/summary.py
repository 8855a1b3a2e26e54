"""`summary.json`: the output contract of a run, read by tests and other tools."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedgate.executor.progress import METRICS_FILE, read_rounds
from fedgate.gate.pipeline import KIND_REFUSED, KIND_SENT, LEDGER_DIR
from fedgate.ledger.store import Ledger


def _finite(value: float) -> float | None:
    return None if math.isinf(value) or math.isnan(value) else value


def hospital_egress(hospital_dir: Path, run_id: int) -> dict[str, Any]:
    """Per-hospital egress figures of one run, from its ledger (the source of truth; a
    hospital's ledger spans every run it took part in)."""
    folder = hospital_dir / LEDGER_DIR
    sent: list[float] = []
    train_bits: list[float] = []
    refusals: list[dict[str, Any]] = []
    if (folder / "ledger.sqlite").is_file():
        with Ledger(folder, create=False) as ledger:
            for entry in ledger.entries():
                if entry.get("run_id") != run_id:
                    continue
                decision = entry.get("decision", {})
                if entry.get("kind") == KIND_SENT:
                    bits = float(decision["bound"]["total_bits"])
                    sent.append(bits)
                    if decision.get("message_type") == "train":
                        train_bits.append(bits)
                elif entry.get("kind") == KIND_REFUSED:
                    refusals.append({"seq": entry["seq"], "round": entry["round"], "rule": decision.get("rule", "")})
    return {
        "replies_sent": len(sent),
        "bits_per_reply": _finite(max(train_bits)) if train_bits else None,
        "bits_total": _finite(sum(sent)),
        "refusals": refusals,
    }


def write_summary(
    out_dir: Path, run_id: int, hospitals: int, rounds: int, seconds: float, hospital_dirs: list[Path], policy_hash: str
) -> dict[str, Any]:
    """Build the summary from the run folder's metrics file and ledgers; write OUT/summary.json."""
    per_round = read_rounds(out_dir / METRICS_FILE)
    summary = build_summary(run_id, hospitals, rounds, seconds, per_round, hospital_dirs, policy_hash)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


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
        "bits_per_reply": {name: e["bits_per_reply"] for name, e in egress.items()},
        "bits_total": {name: e["bits_total"] for name, e in egress.items()},
        "refusals": {name: e["refusals"] for name, e in egress.items() if e["refusals"]},
    }
