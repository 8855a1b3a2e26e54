"""`summary.json`: the output contract of a run, read by tests and other tools. Every egress
figure comes from the hospitals' ledgers through the one typed reader (`gate.entries`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgate.executor.progress import METRICS_FILE, read_rounds
from fedgate.gate.entries import ReplyEntry, claimed_privacy, finite_or_none, read_entries
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
        "epsilon": epsilon_of(sent),
        "epsilon_claimed": claimed_privacy(sent[-1]) if sent else {},
        "training_modes": sorted({str(r.privacy.get("mode")) for r in sent if r.privacy.get("mode")}),
    }


def _level(privacy: dict[str, Any], level: str) -> tuple[float | None, str]:
    """A level's cumulative ε (None where that kind of DP did not apply) and its accountant."""
    figures = privacy.get(level) or {}
    cumulative = figures.get("cumulative") or {}
    if not cumulative or "epsilon" not in cumulative:
        return None, ""
    return finite_or_none(float(cumulative["epsilon"])), str(cumulative.get("accountant", ""))


def epsilon_of(sent: list[ReplyEntry]) -> dict[str, Any]:
    """The enforced ε of a hospital after this run: the cumulative figures (every run this hospital
    took part in) its gate recorded with the last reply it sent. An ε a ClientApp reports is a
    claim and is never read here. `inf` (no noise at all) is reported as None with the reason."""
    accounted = [r for r in sent if r.privacy]
    if not accounted:
        return {"record_level": None, "hospital_level": None, "delta": None, "accountant": ""}
    privacy = accounted[-1].privacy
    record, record_accountant = _level(privacy, "record_level")
    hospital, hospital_accountant = _level(privacy, "hospital_level")
    pairs = (("record", record_accountant), ("hospital", hospital_accountant))
    accountants = [f"{name}: {accountant}" for name, accountant in pairs if accountant]
    library = str(privacy.get("library", ""))
    return {
        "record_level": record,
        "hospital_level": hospital,
        "delta": float(privacy["delta"]) if "delta" in privacy else None,
        "accountant": "; ".join(accountants) + (f" ({library})" if library else ""),
    }


def build_summary(
    run_id: int,
    hospitals: int,
    rounds: int,
    seconds: float,
    per_round: list[dict[str, Any]],
    hospital_dirs: list[Path],
    policy_hash: str,
    training_mode: str | None = None,
) -> dict[str, Any]:
    """`training_mode`: the policy's `[training] mode`; None: what the ledgers show."""
    last = per_round[-1] if per_round else {}
    egress = {d.name: hospital_egress(d, run_id) for d in hospital_dirs}
    if training_mode is None:
        seen = {m for e in egress.values() for m in e["training_modes"]}
        training_mode = "both" if len(seen) > 1 else (seen.pop() if seen else "gated")
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
        "training_mode": training_mode,
        "epsilon": {name: e["epsilon"] for name, e in egress.items()},
        # what a ClientApp reported about its own privacy (metrics named eps/epsilon/...): claims, never enforced
        "epsilon_claimed": {name: e["epsilon_claimed"] for name, e in egress.items() if e["epsilon_claimed"]},
    }


def write_summary(
    out_dir: Path,
    run_dir: Path,
    run_id: int,
    hospitals: int,
    rounds: int,
    seconds: float,
    policy_hash: str,
    training_mode: str | None = None,
) -> dict[str, Any]:
    """Build the summary of one run; write it into the run's folder and as OUT/summary.json."""
    per_round = read_rounds(run_dir / METRICS_FILE)
    hospital_dirs = [out_dir / f"hospital-{i}" for i in range(hospitals)]
    summary = build_summary(run_id, hospitals, rounds, seconds, per_round, hospital_dirs, policy_hash, training_mode)
    text = json.dumps(summary, indent=2) + "\n"
    (run_dir / "summary.json").write_text(text)
    (out_dir / "summary.json").write_text(text)
    return summary
