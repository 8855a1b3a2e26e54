"""Hospital ledgers for the report's tests, each written by the real gate seam
(`admit` / `conclude`) as an executor drives it, with the isolation an executor records."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message
from holding import hold, wait_pending

from conftest import RUN_ID, gate_for, instruction
from fedgate.flower_adapter import message_from_bytes, message_to_bytes
from fedgate.gate.pipeline import AppOutcome, GatePipeline, Outcome
from fedgate.review.queue import ReviewQueue
from malicious_apps import ATTACKS, honest

DESTINATION = "https://superlink.example:9092"
SANDBOXED: dict[str, Any] = {"mode": "sandbox", "enforced": True, "layers": ["bwrap", "seccomp", "landlock"],
                             "downgraded": []}  # fmt: skip
NO_ISOLATION: dict[str, Any] = {"mode": "no-isolation", "enforced": False, "layers": []}
DOWNGRADED: dict[str, Any] = {"mode": "downgraded", "enforced": False, "layers": ["bwrap"],
                              "downgraded": ["seccomp: not available on this host"]}  # fmt: skip
# What the sandbox executor records when the policy allowed a downgrade (mode stays "sandbox").
SANDBOX_NOT_ENFORCED: dict[str, Any] = {"mode": "sandbox", "enforced": False, "layers": ["bwrap"],
                                        "downgraded": ["landlock"]}  # fmt: skip


def hospital_gate(folder: Path, **policy: object) -> GatePipeline:
    gate = gate_for(folder, **policy)
    gate.destination = DESTINATION
    return gate


def seam(
    gate: GatePipeline, ins: Message, app: Callable[[Message], Message], isolation: dict[str, Any] = SANDBOXED
) -> Outcome:
    """One instruction as an executor passes it: bytes in, the app on its own copy, bytes out."""
    raw = message_to_bytes(ins)
    admission = gate.admit(raw)
    outcome = None
    if admission.refusal is None:
        try:
            outcome = AppOutcome(message_to_bytes(app(message_from_bytes(raw))), isolation=isolation)
        except Exception as err:
            outcome = AppOutcome(None, f"{type(err).__name__}: {err}", "client-error", isolation)
    return gate.conclude(admission, outcome)


def clean(folder: Path, run_id: int = RUN_ID, rounds: int = 3) -> Path:
    """Three rounds of train + evaluate in the sandbox, and one refused reply (a ConfigRecord)."""
    gate = hospital_gate(folder)
    for server_round in range(1, rounds + 1):
        seam(gate, instruction(server_round=server_round, run_id=run_id), honest)
        seam(gate, instruction("evaluate", server_round=server_round, run_id=run_id), honest)
    seam(gate, instruction(server_round=rounds + 1, run_id=run_id), ATTACKS["config-record"])
    gate.close()
    return folder / "hospital-0"


def tampered(folder: Path) -> Path:
    """A clean ledger whose entry 2 was edited afterwards (a server round rewritten)."""
    hospital = clean(folder)
    with sqlite3.connect(hospital / "ledger" / "ledger.sqlite") as db:
        raw = db.execute("SELECT entry FROM entries WHERE seq = 2").fetchone()[0]
        edited = raw.replace(b'"server_round":"1"', b'"server_round":"7"')
        assert edited != raw
        db.execute("UPDATE entries SET entry = ? WHERE seq = 2", (edited,))
    return hospital


def unbounded(folder: Path) -> Path:
    """z = 0: updates clipped, not noised (in the sandbox: the bound, not the isolation, is gone)."""
    gate = hospital_gate(folder, noise_multiplier=0.0)
    for server_round in (1, 2):
        seam(gate, instruction(server_round=server_round), honest)
    gate.close()
    return folder / "hospital-0"


def rejected_review(folder: Path) -> Path:
    """A reply held for review and rejected by a person: refused, kept at the hospital."""
    gate = hospital_gate(folder, review_mode="always", review_timeout_s=60.0)
    held = hold(gate, instruction(), honest, seam)
    [item] = wait_pending(folder / "hospital-0")
    queue = ReviewQueue(folder / "hospital-0")
    queue.decide(item.id, False, "Dr Grace Hopper", "the update norm looks odd")
    queue.close()
    assert held.outcome().decision.rule == "review-rejected"
    return folder / "hospital-0"


def two_runs(folder: Path) -> Path:
    """Two runs written into the same hospital folder: the second without isolation."""
    clean(folder, run_id=1001, rounds=2)
    gate = hospital_gate(folder)
    for server_round in (1, 2):
        seam(gate, instruction(server_round=server_round, run_id=2002), honest, NO_ISOLATION)
    gate.close()
    return folder / "hospital-0"


def downgraded(folder: Path, isolation: dict[str, Any] = DOWNGRADED) -> Path:
    """The sandbox could not be fully established and the policy allowed a recorded downgrade."""
    gate = hospital_gate(folder)
    for server_round in (1, 2):
        seam(gate, instruction(server_round=server_round), honest, isolation)
    gate.close()
    return folder / "hospital-0"
