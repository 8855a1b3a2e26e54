"""The review queue, and the pipeline holding replies for a person's decision."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from conftest import instruction
from fedgate.gate.pipeline import GENERIC_REFUSAL, GatePipeline, content_bytes
from fedgate.ledger.verify import verify_ledger
from fedgate.policy import load_policy
from fedgate.review.queue import APPROVED, EXPIRED, PENDING, REJECTED, ReviewError, ReviewQueue
from malicious_apps import honest


def test_submit_is_idempotent_per_instruction(tmp_path: Path) -> None:
    queue = ReviewQueue(tmp_path)
    first = queue.submit("instr-1", "hospital-0", {"round": 1}, b"payload", timeout_s=60)
    again = queue.submit("instr-1", "hospital-0", {"round": 99}, b"other", timeout_s=60)
    assert again.id == first.id and again.payload == b"payload" and again.summary == {"round": 1}
    assert [i.id for i in queue.items(PENDING)] == [first.id]


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


def reviewing_pipeline(tmp_path: Path, mode: str = "always", timeout_s: float = 30.0) -> GatePipeline:
    policy = dataclasses.replace(load_policy(None), review_mode=mode, review_timeout_s=timeout_s)
    return GatePipeline(policy, tmp_path / "hospital-0", "hospital-0", "test://server")


def decide_when_pending(folder: Path, approve: bool, reviewer: str = "Dr Ada") -> threading.Thread:
    def act() -> None:
        queue = ReviewQueue(folder)
        while not queue.items(PENDING):
            time.sleep(0.02)
        queue.decide(queue.items(PENDING)[0].id, approve, reviewer, "checked the tensor table")

    thread = threading.Thread(target=act)
    thread.start()
    return thread


def test_approved_reply_is_sent_exactly_as_reviewed_and_the_approval_is_ledgered_first(tmp_path: Path) -> None:
    gate = reviewing_pipeline(tmp_path)
    ins = instruction()
    reviewer = decide_when_pending(tmp_path / "hospital-0", approve=True)
    outcome = gate.process_with_evidence(ins, honest(ins))
    reviewer.join()
    assert outcome.decision.sent and not outcome.message.has_error()
    item = gate.review_queue.items()[0]
    assert item.status == APPROVED
    assert content_bytes(outcome.message.content) == item.payload
    kinds = [e["kind"] for e in gate.ledger.entries()]
    assert kinds == ["policy", "review-decision", "reply-sent"]
    review = gate.ledger.entries()[1]
    assert (review["status"], review["reviewer"]) == ("approved", "Dr Ada")
    assert item.summary["tensors"][0]["name"] == "conv.weight"
    assert verify_ledger(tmp_path / "hospital-0" / "ledger").entries == 3


def test_rejected_reply_never_leaves(tmp_path: Path) -> None:
    gate = reviewing_pipeline(tmp_path)
    ins = instruction()
    reviewer = decide_when_pending(tmp_path / "hospital-0", approve=False)
    outcome = gate.process_with_evidence(ins, honest(ins))
    reviewer.join()
    assert outcome.message.has_error() and outcome.message.error.reason == GENERIC_REFUSAL
    assert outcome.decision.rule == "review-rejected"
    entries = gate.ledger.entries()
    assert [e["kind"] for e in entries] == ["policy", "review-decision", "reply-refused"]
    assert "refused" in entries[2]["payloads"] and "sent" not in entries[2]["payloads"]


def test_undecided_reply_is_refused_at_the_deadline(tmp_path: Path) -> None:
    gate = reviewing_pipeline(tmp_path, timeout_s=0.3)
    ins = instruction()
    outcome = gate.process_with_evidence(ins, honest(ins))
    assert outcome.decision.rule == "review-timeout" and outcome.message.has_error()


@pytest.mark.parametrize(
    ("mode", "server_round", "held"),
    [("never", 1, False), ("first-rounds:2", 2, True), ("first-rounds:2", 3, False), ("on-warning", 1, False)],
)
def test_review_modes(tmp_path: Path, mode: str, server_round: int, held: bool) -> None:
    gate = reviewing_pipeline(tmp_path, mode=mode, timeout_s=0.3)
    ins = instruction(server_round=server_round)
    outcome = gate.process_with_evidence(ins, honest(ins))
    assert outcome.decision.sent != held  # a held reply nobody decides times out


def test_on_warning_holds_a_clipped_update(tmp_path: Path) -> None:
    from malicious_apps import huge_norm

    gate = reviewing_pipeline(tmp_path, mode="on-warning", timeout_s=0.3)
    ins = instruction()
    outcome = gate.process_with_evidence(ins, huge_norm(ins))
    assert outcome.decision.rule == "review-timeout"
    assert "update-clipped" in gate.review_queue.items()[0].summary["decision"]["warnings"]
