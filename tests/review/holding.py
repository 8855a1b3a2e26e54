"""Helpers for review tests: one instruction through the gate on a thread (it blocks while
the reply is held), the queue as a reviewer or an attacker sees it, and the review page
without a browser (FastAPI's TestClient)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message

from conftest import through_gate
from fedgate.gate.entries import KIND_REVIEW_HELD, Entry, ReplyEntry, ReviewEntry, read_entries
from fedgate.gate.pipeline import GatePipeline, Outcome
from fedgate.ledger.store import Ledger
from fedgate.review.app import create_app
from fedgate.review.queue import PENDING, ReviewItem, ReviewQueue

with warnings.catch_warnings():  # starlette would rather have `httpx2`; httpx is what we pin
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 60.0  # a safety net for a hung test, not a measurement


@dataclass
class Held:
    """A reply on its way through the gate on another thread."""

    thread: threading.Thread
    result: list[Outcome] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def outcome(self) -> Outcome:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the gate is still waiting for a decision"
        if self.errors:
            raise self.errors[0]
        return self.result[0]


def hold(
    gate: GatePipeline,
    ins: Message,
    app: Callable[[Message], Message],
    seam: Callable[[GatePipeline, Message, Callable[[Message], Message]], Outcome] = through_gate,
) -> Held:
    held = Held(threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            held.result.append(seam(gate, ins, app))
        except BaseException as err:
            held.errors.append(err)
        finally:
            gate.close()  # its SQLite connection belongs to this thread

    held.thread = threading.Thread(target=run, daemon=True)
    held.thread.start()
    return held


def wait_pending(folder: Path, count: int = 1) -> list[ReviewItem]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if (folder / "review.sqlite").is_file():
            queue = ReviewQueue(folder)
            try:
                pending = queue.items(PENDING)
            finally:
                queue.close()
            if len(pending) >= count:
                return pending
        time.sleep(0.02)
    raise AssertionError(f"no pending review item in {folder}")


def _ledger(where: GatePipeline | Path) -> Ledger:
    folder = where.hospital_dir if isinstance(where, GatePipeline) else where
    return Ledger(folder / "ledger", create=False)


def entries(where: GatePipeline | Path) -> list[Entry]:
    """A hospital's ledger (its gate, or its folder), read on this thread: the gate may be
    appending on another."""
    with _ledger(where) as ledger:
        return read_entries(ledger)


def blob(where: GatePipeline | Path, digest: str) -> bytes:
    with _ledger(where) as ledger:
        return ledger.blobs.get(digest)


def held_entries(where: GatePipeline | Path) -> list[ReviewEntry]:
    return [e for e in entries(where) if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW_HELD]


def reply_entries(where: GatePipeline | Path) -> list[ReplyEntry]:
    return [e for e in entries(where) if isinstance(e, ReplyEntry)]


@contextmanager
def page(root: Path) -> Iterator[TestClient]:
    app, _ = create_app(root, TOKEN)
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        yield client


def csrf_of(html: str) -> str:
    return html.split('name="csrf" value="')[1].split('"')[0]


def decide_on_page(client: TestClient, hospital: str, item_id: int, action: str, reviewer: str) -> int:
    html = client.get(f"/items/{hospital}/{item_id}", headers=AUTH).text
    form = {"action": action, "reviewer": reviewer, "reason": "checked the hash", "csrf": csrf_of(html)}
    response = client.post(f"/items/{hospital}/{item_id}/decision", data=form, headers=AUTH, follow_redirects=False)
    return response.status_code
