"""The seam: rules, then a durable record of the exact bytes, then the message to send."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from conftest import instruction
from fedgate.gate.pipeline import GENERIC_REFUSAL, GatePipeline, content_bytes
from fedgate.ledger.verify import verify_ledger
from fedgate.policy import load_policy
from malicious_apps import ATTACKS, CANARY, CANARY_TEXT, honest


def pipeline(tmp_path: Path, **changes: object) -> GatePipeline:
    policy = dataclasses.replace(load_policy(None), **changes)  # type: ignore[arg-type]
    return GatePipeline(policy, tmp_path / "hospital-0", "hospital-0", "test://server")


def test_sent_reply_is_recorded_byte_for_byte_before_it_is_returned(tmp_path: Path) -> None:
    gate = pipeline(tmp_path)
    ins = instruction()
    outcome = gate.process_with_evidence(ins, honest(ins))
    assert outcome.decision.sent and not outcome.message.has_error()
    assert outcome.message.metadata.reply_to_message_id == ins.metadata.message_id
    entry = gate.ledger.entries()[outcome.seq]
    assert entry["kind"] == "reply-sent" and entry["round"] == 1 and entry["hospital"] == "hospital-0"
    stored = gate.ledger.blobs.get(entry["payloads"]["sent"]["sha256"])
    assert stored == content_bytes(outcome.message.content)
    assert entry["content_object_id"] == outcome.message.content.object_id
    assert entry["policy_hash"] == gate.policy.hash
    gate.close()
    # the policy in force (once per run), then the reply
    assert [e["kind"] for e in gate.ledger.entries()] == ["policy", "reply-sent"]
    assert verify_ledger(tmp_path / "hospital-0" / "ledger").entries == 2


@pytest.mark.parametrize("attack", ["config-record", "raises", "metric-string", "metrics-renamed"])
def test_refusal_sends_only_a_generic_error_and_keeps_the_evidence(tmp_path: Path, attack: str) -> None:
    gate = pipeline(tmp_path)
    ins = instruction()
    try:
        reply = ATTACKS[attack](ins)
    except Exception as err:
        reply = err  # type: ignore[assignment]
    outcome = gate.process_with_evidence(ins, reply)
    assert outcome.message.has_error()
    assert outcome.message.error.reason == GENERIC_REFUSAL
    assert CANARY_TEXT not in outcome.message.error.reason
    entry = gate.ledger.entries()[outcome.seq]
    assert entry["kind"] == "reply-refused" and entry["decision"]["rule"] == outcome.decision.rule
    if "refused" in entry["payloads"]:  # what was stopped is kept locally for inspection
        assert CANARY in gate.ledger.blobs.get(entry["payloads"]["refused"]["sha256"])
    else:
        assert CANARY_TEXT in entry["decision"]["reason"]


def test_history_is_rebuilt_from_the_ledger(tmp_path: Path) -> None:
    ins = instruction()
    first = pipeline(tmp_path).process_with_evidence(ins, honest(ins))
    again = pipeline(tmp_path)  # a new process after a crash: only the ledger remembers
    ins2 = instruction(server_round=2)
    second = again.process_with_evidence(ins2, honest(ins2))
    assert second.cumulative_bits == pytest.approx(2 * first.decision.bound.total)
    other_model = instruction(tensors={"w": np.zeros(3, dtype=np.float32)})
    assert again.process_with_evidence(other_model, honest(other_model)).decision.rule == "manifest-not-approved"


def test_halt_policy_refuses_everything_after_one_refusal(tmp_path: Path) -> None:
    gate = pipeline(tmp_path, on_refusal="halt")
    ins = instruction()
    assert gate.process_with_evidence(ins, ATTACKS["nan"](ins)).decision.rule == "non-finite"
    assert gate.process_with_evidence(ins, honest(ins)).decision.rule == "halted"


def test_unwritable_ledger_means_nothing_is_sent(tmp_path: Path) -> None:
    from fedgate.errors import LedgerError

    gate = pipeline(tmp_path)
    ins = instruction()
    gate.process(ins, honest(ins))
    gate.ledger.db.execute("PRAGMA query_only = ON")  # appends now fail
    with pytest.raises(LedgerError):
        gate.process(ins, honest(ins))
