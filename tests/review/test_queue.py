"""The review queue, and the gate holding replies for a person's decision, bound to bytes:
what is approved is exactly what the gate held, and nothing else ever leaves."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from flwr.app import ConfigRecord
from holding import AUTH, blob, decide_on_page, entries, held_entries, hold, page, reply_entries, wait_pending

from conftest import gate_for, instruction, through_gate
from fedgate.flower_adapter import message_to_bytes, recorddict_from_bytes, recorddict_to_bytes
from fedgate.gate.entries import KIND_REVIEW, KIND_REVIEW_HELD, ReviewEntry
from fedgate.gate.pipeline import GENERIC_REFUSAL
from fedgate.ledger.verify import verify_ledger
from fedgate.review.queue import APPROVED, EXPIRED, PENDING, REJECTED, ReviewError, ReviewQueue
from malicious_apps import CANARY, CANARY_TEXT, honest, huge_norm


def test_submit_is_idempotent_per_instruction(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path)
    first = queue.submit("instr-1", "hospital-0", {"round": 1}, b"payload", timeout_s=60)
    again = queue.submit("instr-1", "hospital-0", {"round": 99}, b"other", timeout_s=60)
    assert again.id == first.id and again.payload == b"payload" and again.summary == {"round": 1}
    assert [i.id for i in queue.items(PENDING)] == [first.id]
    assert first.payload_sha256 == hashlib.sha256(b"payload").hexdigest()


def test_decide_needs_a_name_and_a_pending_item(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path)
    item = queue.submit("instr-1", "hospital-0", {}, b"x", timeout_s=60)
    with pytest.raises(ReviewError, match="name"):
        queue.decide(item.id, True, "  ", "")
    decided = queue.decide(item.id, False, "Dr Ada", "metrics look odd")
    assert (decided.status, decided.reviewer, decided.reason) == (REJECTED, "Dr Ada", "metrics look odd")
    with pytest.raises(ReviewError, match="rejected"):
        queue.decide(item.id, True, "Dr Bob", "")


def test_a_pending_item_expires_and_cannot_be_approved_late(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path)
    item = queue.submit("instr-1", "hospital-0", {}, b"x", timeout_s=0.2)
    assert queue.wait(item.id, poll_s=0.05).status == EXPIRED
    with pytest.raises(ReviewError):
        queue.decide(item.id, True, "Dr Late", "")


def test_approval_sends_exactly_the_bytes_the_gate_held_and_the_page_showed(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=60.0)
    folder = tmp_path / "hospital-0"
    held = hold(gate, instruction(), honest)
    [item] = wait_pending(folder)
    [held_entry] = held_entries(gate)  # in the ledger before anyone could decide
    held_bytes = blob(gate, held_entry.payload_sha256)
    assert hashlib.sha256(item.payload).hexdigest() == held_entry.payload_sha256
    with page(tmp_path) as client:
        html = client.get(f"/items/hospital-0/{item.id}", headers=AUTH).text
        assert f'<code id="payload-sha256">{held_entry.payload_sha256}</code>' in html
        assert "exactly the bytes the gate held" in html and f"entry {held_entry.seq}" in html
        assert decide_on_page(client, "hospital-0", item.id, "approve", "Dr Ada") == 303
    out = held.outcome()
    assert out.decision.sent and out.message is not None and not out.message.has_error()
    assert recorddict_to_bytes(out.message.content) == held_bytes  # what left is what was held and shown
    [sent] = reply_entries(gate)
    assert sent.sent and sent.payload_sha256 == held_entry.payload_sha256
    ledger = entries(gate)
    assert [getattr(e, "kind", type(e).__name__) for e in ledger] == [
        "PolicyEntry", KIND_REVIEW_HELD, KIND_REVIEW, "ReplyEntry"]  # fmt: skip
    decision = ledger[2]
    assert isinstance(decision, ReviewEntry) and (decision.status, decision.reviewer) == (APPROVED, "Dr Ada")
    assert decision.payload_sha256 == held_entry.payload_sha256  # the hash the person approved
    assert verify_ledger(folder / "ledger").entries == 4


def _swap_payload(folder: Path, item_id: int, summary_too: bool) -> bytes:
    """What someone with write access to the hospital folder can do: add a ConfigRecord that
    carries an image's bytes to the held payload, re-serialise it, write it into the queue."""
    with sqlite3.connect(folder / "review.sqlite") as db:
        payload, summary = db.execute("SELECT payload, summary FROM items WHERE id = ?", (item_id,)).fetchone()
        content = recorddict_from_bytes(bytes(payload))
        content["extra"] = ConfigRecord({"image": CANARY, "note": CANARY_TEXT})
        swapped = recorddict_to_bytes(content)
        if summary_too:
            summary = summary.replace(hashlib.sha256(payload).hexdigest(), hashlib.sha256(swapped).hexdigest())
        db.execute("UPDATE items SET payload = ?, summary = ? WHERE id = ?", (swapped, summary, item_id))
    return swapped


def test_a_swapped_payload_cannot_be_approved_on_the_page(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=60.0)
    folder = tmp_path / "hospital-0"
    held = hold(gate, instruction(), honest)
    [item] = wait_pending(folder)
    swapped = _swap_payload(folder, item.id, summary_too=True)
    with page(tmp_path) as client:
        html = client.get(f"/items/hospital-0/{item.id}", headers=AUTH).text
        assert hashlib.sha256(swapped).hexdigest() in html  # the page shows the bytes as they are now ...
        assert "NOT the bytes the gate held" in html  # ... and that the gate did not hold them
        assert 'id="form-approve"' not in html and 'id="form-reject"' in html
        assert "Other records in the payload: extra" in html
        assert decide_on_page(client, "hospital-0", item.id, "approve", "Mallory") == 409
        assert decide_on_page(client, "hospital-0", item.id, "reject", "Dr Ada") == 303
    out = held.outcome()
    assert not out.decision.sent and out.decision.rule == "review-rejected"


def test_a_swapped_payload_with_a_forged_approval_never_leaves(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=60.0)
    folder = tmp_path / "hospital-0"
    held = hold(gate, instruction(), honest)
    [item] = wait_pending(folder)
    swapped = _swap_payload(folder, item.id, summary_too=True)
    queue = ReviewQueue(folder)
    queue.decide(item.id, True, "Mallory", "forged")  # straight into the queue, no page
    queue.close()
    out = held.outcome()
    assert not out.decision.sent and out.decision.rule == "review-tampered"
    assert out.message is not None and out.message.has_error() and out.message.error.reason == GENERIC_REFUSAL
    sent = message_to_bytes(out.message)
    assert CANARY not in sent and CANARY_TEXT.encode() not in sent
    [reply] = reply_entries(gate)
    assert not reply.sent and reply.rule == "review-tampered"
    decision = next(e for e in entries(gate) if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW)
    assert decision.payload_sha256 == hashlib.sha256(swapped).hexdigest()  # the ledger names what was approved


def test_rejected_reply_never_leaves(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=60.0)
    held = hold(gate, instruction(), honest)
    [item] = wait_pending(tmp_path / "hospital-0")
    with page(tmp_path) as client:
        assert decide_on_page(client, "hospital-0", item.id, "reject", "Dr Grace") == 303
    out = held.outcome()
    assert out.message is not None and out.message.has_error() and out.message.error.reason == GENERIC_REFUSAL
    assert not out.message.has_content() and out.decision.rule == "review-rejected"
    [reply] = reply_entries(gate)
    assert not reply.sent and reply.rule == "review-rejected"


def test_undecided_reply_is_refused_at_the_deadline(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=0.3)
    out = through_gate(gate, instruction(), honest)
    assert out.decision.rule == "review-timeout"
    assert out.message is not None and out.message.has_error() and not out.message.has_content()
    assert [(r.sent, r.rule) for r in reply_entries(gate)] == [(False, "review-timeout")]


def test_first_rounds_counts_the_gates_own_rounds_not_the_servers(tmp_path: Path) -> None:
    """A server that claims round 99 is still in the gate's first round, so it is reviewed."""
    gate = gate_for(tmp_path, review_mode="first-rounds:1", review_timeout_s=0.3)
    first = through_gate(gate, instruction(server_round=99), honest)
    assert first.decision.rule == "review-timeout"  # held; nobody decided
    queue = ReviewQueue(tmp_path / "hospital-0")
    [item] = queue.items()
    queue.close()
    assert (item.summary["round"], item.summary["server_round"]) == (1, "99")
    second = through_gate(gate, instruction(server_round=1), honest)
    assert second.decision.sent  # the gate's round 2: past first-rounds:1, not held
    assert [(r.gate_round, r.server_round, r.sent) for r in reply_entries(gate)] == [(1, "99", False), (2, "1", True)]


@pytest.mark.parametrize(("mode", "held"), [("never", False), ("on-warning", False), ("first-rounds:2", True)])
def test_review_modes(tmp_path: Path, mode: str, held: bool) -> None:
    gate = gate_for(tmp_path, review_mode=mode, review_timeout_s=0.3)
    out = through_gate(gate, instruction(), honest)
    assert out.decision.sent != held  # a held reply nobody decides times out
    assert bool(held_entries(gate)) == held


def test_on_warning_holds_a_clipped_update(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, review_mode="on-warning", review_timeout_s=0.3)
    out = through_gate(gate, instruction(), huge_norm)
    assert out.decision.rule == "review-timeout"
    queue = ReviewQueue(tmp_path / "hospital-0")
    assert "update-clipped" in queue.items()[0].summary["decision"]["warnings"]
    queue.close()
