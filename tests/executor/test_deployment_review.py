"""In deployment, a reply held for review stays alive past Flower's task-expiry window:
the node's task heartbeat keeps running while a person decides."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from fedgate.executor.local_federation import run_local_deployment
from fedgate.ledger.store import Ledger
from fedgate.policy import default_policy_text
from fedgate.review.queue import PENDING, ReviewQueue
from test_deployment import make_test_fab

# Flower's task heartbeat: every 30 s, expiry after 2 missed beats; decide after longer than that.
DECIDE_AFTER_S = 100


@pytest.mark.slow
def test_review_longer_than_task_expiry_still_delivers(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(default_policy_text().replace('mode = "never"', 'mode = "always"'))
    out = tmp_path / "deploy"
    held_for: list[float] = []

    def reviewer() -> None:
        folder = out / "hospital-0"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (folder / "review.sqlite").exists():
                queue = ReviewQueue(folder)
                pending = queue.items(PENDING)
                if pending:
                    time.sleep(DECIDE_AFTER_S)
                    queue.decide(pending[0].id, True, "Dr Patient", "took my time")
                    held_for.append(DECIDE_AFTER_S)
                    return
                queue.close()
            time.sleep(0.5)

    thread = threading.Thread(target=reviewer, daemon=True)
    thread.start()
    config = {"attacks": "honest", "phases": "train:1", "capture-file": "server-received.bin"}
    summary = run_local_deployment(
        out, 1, 1, policy, config, Console(quiet=True), app_dir=make_test_fab(tmp_path / "fab")
    )
    thread.join(timeout=10)
    assert held_for == [DECIDE_AFTER_S]
    assert summary["egress"]["hospital-0"]["replies_sent"] == 1
    with Ledger(out / "hospital-0" / "ledger", create=False) as ledger:
        kinds = [e["kind"] for e in ledger.entries()]
    assert kinds == ["policy", "review-held", "review-decision", "reply-sent"]
    capture = (out / "runs" / str(summary["run_id"]) / "server-received.bin").read_bytes()
    assert capture and b"refused" not in capture
