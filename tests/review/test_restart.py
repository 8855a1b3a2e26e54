"""A node that dies while a reply is pending and comes back (re-running the same instruction,
with fresh noise, so it holds different bytes) must send the payload the reviewer approved:
the first attempt's, from the gate's own ledger, once, with one ledger record per decision."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from flwr.app import ConfigRecord
from holding import AUTH, blob, decide_on_page, entries, held_entries, hold, page, reply_entries, wait_pending

from browser import env, review_page
from conftest import gate_for, instruction, through_gate
from fedgate.flower_adapter import message_to_bytes, recorddict_from_bytes, recorddict_to_bytes, set_message_id
from fedgate.gate.entries import KIND_REVIEW, ReviewEntry
from fedgate.ledger.verify import verify_ledger
from fedgate.review.queue import PENDING, ReviewQueue
from malicious_apps import CANARY, honest

NODE = Path(__file__).with_name("review_node.py")
WAIT_S = 60.0  # a safety net for a hung test, not a measurement


class NodeDied(BaseException):
    """Stands for SIGKILL while the gate waits for the reviewer."""


def die_while_pending(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """First attempt: hold the reply, then die before any decision. Returns the instruction id."""

    def killed(self: ReviewQueue, item_id: int, poll_s: float = 0.25) -> None:
        raise NodeDied

    ins = instruction(created_at=1_800_000_000.0)
    set_message_id(ins, "re-delivered-instruction")
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=60.0)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(ReviewQueue, "wait", killed)
            with pytest.raises(NodeDied):
                through_gate(gate, ins, honest)
    finally:
        gate.close()  # as the kernel closes a killed node's files (and releases its gate lock)
    return ins.metadata.message_id


def test_a_restarted_gate_sends_what_the_reviewer_approved_not_its_new_reply(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "hospital-0"
    instruction_id = die_while_pending(monkeypatch, tmp_path)
    [item] = wait_pending(folder)
    ins = instruction(created_at=1_800_000_000.0)
    set_message_id(ins, instruction_id)
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=60.0)  # the node comes back
    held = hold(gate, ins, honest)
    deadline = time.monotonic() + WAIT_S
    while len(held_entries(gate)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    first, second = held_entries(gate)
    assert first.payload_sha256 != second.payload_sha256  # fresh noise: the new attempt holds other bytes
    assert item.payload_sha256 == first.payload_sha256  # the queue kept the first attempt's item
    with page(tmp_path) as client:
        html = client.get(f"/items/hospital-0/{item.id}", headers=AUTH).text
        assert first.payload_sha256 in html and f"(entry {first.seq}, <code>review-held</code>)" in html
        assert decide_on_page(client, "hospital-0", item.id, "approve", "Dr Restart") == 303
    out = held.outcome()
    assert out.decision.sent and out.message is not None
    assert recorddict_to_bytes(out.message.content) == blob(gate, first.payload_sha256)
    [reply] = reply_entries(gate)
    assert reply.sent and reply.payload_sha256 == first.payload_sha256
    decisions = [e for e in entries(gate) if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW]
    assert [(d.status, d.reviewer, d.payload_sha256) for d in decisions] == [
        ("approved", "Dr Restart", first.payload_sha256)]  # fmt: skip
    assert verify_ledger(folder / "ledger").entries == 5  # policy, held, held, decision, reply


def test_a_restarted_gate_does_not_send_a_blob_edited_after_it_was_held(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "hospital-0"
    instruction_id = die_while_pending(monkeypatch, tmp_path)
    [item] = wait_pending(folder)
    [held_entry] = held_entries(folder)
    content = recorddict_from_bytes(item.payload)
    content["extra"] = ConfigRecord({"image": CANARY})
    path = next(p for p in (folder / "ledger" / "blobs").rglob(held_entry.payload_sha256) if p.is_file())
    path.chmod(0o644)
    path.write_bytes(recorddict_to_bytes(content))  # write access to the hospital folder, not to the key
    queue = ReviewQueue(folder)
    queue.decide(item.id, True, "Dr Ada", "the hash on the page matched")
    queue.close()
    ins = instruction(created_at=1_800_000_000.0)
    set_message_id(ins, instruction_id)
    out = through_gate(gate_for(tmp_path, review_mode="always", review_timeout_s=60.0), ins, honest)
    assert out.message is not None and CANARY not in message_to_bytes(out.message)
    assert not out.decision.sent


def start_node(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(NODE), str(folder)], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def held_count(folder: Path) -> int:
    if not (folder / "ledger" / "ledger.sqlite").is_file():
        return 0
    return len(held_entries(folder))


def wait_until_held(folder: Path, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while held_count(folder) < count:
        assert time.monotonic() < deadline, f"fewer than {count} review-held entries in {folder}"
        time.sleep(0.05)


def test_a_killed_node_comes_back_and_sends_the_approved_payload(tmp_path: Path) -> None:
    """As above, with a real SIGKILL of a node process and the review page as `fedgate review` serves it."""
    folder = tmp_path / "hospital-0"
    node = start_node(tmp_path)
    [item] = wait_pending(folder)
    node.kill()  # SIGKILL while the reply is pending
    node.wait()
    queue = ReviewQueue(folder)
    assert [i.id for i in queue.items(PENDING)] == [item.id]
    queue.close()

    node = start_node(tmp_path)  # the node comes back, re-runs the instruction, waits on the same item
    wait_until_held(folder, 2)
    assert [i.id for i in wait_pending(folder)] == [item.id]
    with review_page(tmp_path) as (base, token, _):
        headers = {"Authorization": f"Bearer {token}"}
        html = httpx.get(f"{base}/items/hospital-0/{item.id}", headers=headers).text
        assert ">(pending)<" in html  # the heading shows the state, not just a CSS class name
        assert item.payload_sha256 in html and "exactly the bytes the gate held" in html
        csrf = html.split('name="csrf" value="')[1].split('"')[0]
        form = {"action": "approve", "reviewer": "Dr Restart", "reason": "after the outage", "csrf": csrf}
        response = httpx.post(f"{base}/items/hospital-0/{item.id}/decision", data=form, headers=headers)
        assert response.status_code in (200, 303)
        output, _ = node.communicate(timeout=WAIT_S)
    result = json.loads(output)
    first, second = held_entries(folder)
    assert result == {"sent": True, "rule": "", "sha256": first.payload_sha256}  # what the reviewer saw
    assert second.payload_sha256 != first.payload_sha256
    decisions = [e for e in entries(folder) if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW]
    assert [(e.status, e.reviewer) for e in decisions] == [("approved", "Dr Restart")]
    assert [(r.sent, r.payload_sha256) for r in reply_entries(folder)] == [(True, first.payload_sha256)]
    assert hashlib.sha256(blob(folder, first.payload_sha256)).hexdigest() == first.payload_sha256
