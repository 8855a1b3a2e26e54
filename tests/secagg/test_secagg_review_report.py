"""What a person sees: the review page shows the gated update before masking and says that the
gate masks it after approval; the DPO report says which updates left masked and on which
assumption their bound rests. In this process, five hospitals (`inprocess`)."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from inprocess import HospitalGrid, distributed, federation
from secagg_apps import app, run_server

from conftest import RUN_ID, policy_with
from fedgate.gate.entries import KIND_REVIEW_HELD, ReplyEntry, ReviewEntry, read_entries
from fedgate.ledger.store import Ledger
from fedgate.report.facts import read_facts
from fedgate.report.render import render_facts
from fedgate.review.app import create_app
from fedgate.review.queue import PENDING, ReviewQueue
from fedgate.secagg import SecAggPolicy

with warnings.catch_warnings():  # starlette would rather have `httpx2`; httpx is what we pin
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

HOSPITALS = 5
SECAGG = SecAggPolicy(enabled=True, threshold=3, assumed_honest=3)
TOKEN = "test-token-0123456789"
WAIT_S = 60.0  # a safety net for a hung test, not a measurement


def _serve(grid: HospitalGrid) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})

    def run() -> None:
        try:
            run_server(grid, context, 1, num_shares=HOSPITALS, threshold=SECAGG.threshold)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _pending(folder: Path) -> list[Any]:
    if not (folder / "review.sqlite").is_file():
        return []
    queue = ReviewQueue(folder)
    try:
        return queue.items(PENDING)
    finally:
        queue.close()


def test_the_reviewer_sees_the_unmasked_update_and_is_told_it_is_masked_after_approval(tmp_path: Path) -> None:
    policy = distributed(policy_with(review_mode="always", review_timeout_s=WAIT_S), SECAGG.assumed_honest)
    grid = federation(tmp_path, policy, SECAGG, app, HOSPITALS, RUN_ID, {})
    thread, errors = _serve(grid)
    folders = [tmp_path / f"hospital-{i}" for i in range(HOSPITALS)]
    page = ""
    try:
        decided: set[str] = set()
        deadline = time.monotonic() + WAIT_S
        while len(decided) < HOSPITALS and time.monotonic() < deadline:
            for folder in folders:
                for item in _pending(folder):
                    if not page:
                        site, _ = create_app(tmp_path, TOKEN)
                        with TestClient(site, base_url="http://127.0.0.1:8765") as client:
                            auth = {"Authorization": f"Bearer {TOKEN}"}
                            page = client.get(f"/items/{folder.name}/{item.id}", headers=auth).text
                    queue = ReviewQueue(folder)
                    queue.decide(item.id, True, "Dr Grace Hopper", "norms as expected")
                    queue.close()
                    decided.add(folder.name)
            time.sleep(0.02)
        thread.join(WAIT_S)
    finally:
        grid.close()
    assert not thread.is_alive() and not errors, errors
    assert "Masked after your review" in page and "the gated update before masking" in page
    assert "Approving sends exactly these bytes" not in page  # not true here: they are masked first
    assert "<tr><td>0</td><td>[100, 100]</td><td>float32</td>" in page  # the unmasked reply's tensors, with norms
    for folder in folders:
        with Ledger(folder / "ledger", create=False) as ledger:
            entries = read_entries(ledger)
        [held] = [e for e in entries if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW_HELD]
        [sent] = [e for e in entries if isinstance(e, ReplyEntry) and e.sent]
        assert held.payload_sha256 != sent.payload_sha256  # what left is the masked vector, recorded as such
        assert any(stage["stage"] == "secagg" for stage in sent.decision["stages"])


def test_the_report_says_which_updates_left_masked_and_on_what_assumption(tmp_path: Path) -> None:
    policy = distributed(policy_with(), SECAGG.assumed_honest)
    grid = federation(tmp_path, policy, SECAGG, app, HOSPITALS, RUN_ID, {})
    thread, errors = _serve(grid)
    thread.join(WAIT_S)
    grid.close()
    assert not errors, errors
    facts = read_facts(tmp_path / "hospital-0")
    [run] = facts.runs
    assert len(run.masked) == 1 and run.masked[0].secagg is not None
    html = render_facts(facts)
    assert "1 model update left masked" in html and "after human review" in html
    assert "at least 3 hospitals whose gates added honest noise" in html  # the assumption, recorded, shown
    assert "then masked" in html and f"{int(np.prod((100, 100))) + 100:,} coordinates" in html
