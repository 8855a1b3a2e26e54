"""Every malicious route is refused with its rule named (or, for the norm, clipped)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from conftest import instruction
from fedgate.canonical import canonical_json
from fedgate.gate.decide import GateHistory, decide
from fedgate.gate.manifest import Manifest
from fedgate.policy import Policy, load_policy
from malicious_apps import ATTACKS, CANARY, honest


def with_settings(**changes: object) -> Policy:
    """The shipped default policy with some settings changed."""
    return dataclasses.replace(load_policy(None), **changes)  # type: ignore[arg-type]


@pytest.fixture
def policy() -> Policy:
    return with_settings(clip_norm=1.0, noise_multiplier=0.01)


def run_attack(name: str, policy: Policy, message_type: str = "train"):
    ins = instruction(message_type)
    try:
        reply = ATTACKS[name](ins)
    except Exception as err:  # what the executor does with an exception
        from flwr.app import Error, Message

        reply = Message(Error(code=2, reason=str(err)), reply_to=ins)
    return decide(ins, reply, policy, GateHistory(), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("attack", "rule"),
    [
        ("extra-array-record", "extra-record"),
        ("config-record", "config-record"),
        ("metric-string", "metric-not-allowed"),
        ("metric-not-allowed", "metric-not-allowed"),
        ("metric-list", "metric-type"),
        ("metrics-renamed", "extra-record"),
        ("float64", "manifest"),
        ("changed-shape", "manifest"),
        ("added-tensor", "manifest"),
        ("nan", "non-finite"),
        ("wrong-reply-to", "reply-mismatch"),
        ("raises", "client-error"),
        ("integer-tensor", "integer-tensor"),
    ],
)
def test_each_attack_is_refused_by_its_rule(attack: str, rule: str, policy: Policy) -> None:
    decision, content = run_attack(attack, policy)
    assert not decision.sent
    assert content is None
    assert decision.rule == rule, decision.reason
    assert decision.stages[-1].stage == rule and not decision.stages[-1].passed
    canonical_json(decision.to_json())  # evidence must be hashable as is


def test_manifest_refusal_says_what_differs(policy: Policy) -> None:
    decision, _ = run_attack("added-tensor", policy)
    assert decision.detail["diff"]["added"] == ["leak"]
    decision, _ = run_attack("float64", policy)
    assert decision.detail["diff"]["changed"]["conv.weight"] == {
        "declared": ["float32", [4, 1, 3, 3]],
        "got": ["float64", [4, 1, 3, 3]],
    }


def test_huge_norm_is_clipped_not_refused(policy: Policy) -> None:
    ins = instruction()
    decision, content = run_attack("huge-norm", with_settings(noise_multiplier=0.0))
    assert decision.sent and content is not None
    clip_stage = next(s for s in decision.stages if s.stage == "clip")
    assert float(clip_stage.detail["norm"]) > 1e3
    global_ = {k: a.numpy() for k, a in ins.content["arrays"].items()}
    sent = {k: a.numpy() for k, a in content["arrays"].items()}
    update_norm = math.sqrt(sum(float(np.sum((sent[k].astype(np.float64) - global_[k]) ** 2)) for k in sent))
    assert update_norm == pytest.approx(1.0, rel=1e-5)


def test_honest_reply_is_sent_rebuilt_with_quantised_metrics(policy: Policy) -> None:
    ins = instruction()
    decision, content = decide(ins, honest(ins), policy, GateHistory(), np.random.default_rng(0))
    assert decision.sent and content is not None, decision.reason
    assert sorted(content.keys()) == ["arrays", "metrics"]
    assert Manifest.of(content["arrays"]) == Manifest.of(ins.content["arrays"])
    assert dict(content["metrics"]) == {"train-loss": pytest.approx(0.43), "num-examples": 100}
    assert content["arrays"]["steps"].numpy().tolist() == [3]  # integer tensors pass unchanged
    assert decision.bound.update_bits == pytest.approx(1 / (2 * 0.01**2 * math.log(2)))
    assert decision.bound.metric_bits == pytest.approx(math.log2(1001) + math.log2(1000))
    assert decision.bound.total == pytest.approx(decision.bound.update_bits + decision.bound.metric_bits + 1)


def test_evaluate_reply_may_not_carry_arrays(policy: Policy) -> None:
    ins = instruction("evaluate")
    from flwr.app import Message, MetricRecord, RecordDict

    sneaky = Message(
        RecordDict({"arrays": ins.content["arrays"], "metrics": MetricRecord({"eval-acc": 0.9})}), reply_to=ins
    )
    decision, _ = decide(ins, sneaky, policy, GateHistory(), np.random.default_rng(0))
    assert decision.rule == "extra-record"
    decision, content = decide(ins, honest(ins), policy, GateHistory(), np.random.default_rng(0))
    assert decision.sent and content is not None and list(content.keys()) == ["metrics"]
    assert decision.bound.update_bits == 0.0


def test_query_messages_are_refused_unless_allowed(policy: Policy) -> None:
    ins = instruction("query")
    decision, _ = decide(ins, honest(ins), policy, GateHistory(), np.random.default_rng(0))
    assert decision.rule == "message-type"


def test_pinned_manifest_refuses_another_model(policy: Policy) -> None:
    other = {"w": np.zeros((3, 3), dtype=np.float32)}
    ins = instruction(tensors=other)
    history = GateHistory(pinned_manifest=Manifest.of(instruction().content["arrays"]).hash)
    decision, _ = decide(ins, honest(ins), policy, history, np.random.default_rng(0))
    assert decision.rule == "manifest-not-approved"


def test_approved_manifest_in_policy_is_enforced_from_round_one() -> None:
    approved = Manifest.of(instruction().content["arrays"]).hash
    good = with_settings(approved_manifest=approved)
    bad = with_settings(approved_manifest="0" * 64)
    ins = instruction()
    assert decide(ins, honest(ins), good, GateHistory(), np.random.default_rng(0))[0].sent
    assert decide(ins, honest(ins), bad, GateHistory(), np.random.default_rng(0))[0].rule == "manifest-not-approved"


def test_budget_refuses_once_the_bound_would_pass_it() -> None:
    policy = with_settings(noise_multiplier=0.1, max_total_bits=200.0)
    ins = instruction()
    per_reply = decide(ins, honest(ins), policy, GateHistory(), np.random.default_rng(0))[0].bound.total
    assert per_reply < 200
    history = GateHistory(cumulative_bits=200 - per_reply / 2)
    decision, _ = decide(ins, honest(ins), policy, history, np.random.default_rng(0))
    assert decision.rule == "budget"


def test_halted_gate_refuses_everything(policy: Policy) -> None:
    ins = instruction()
    decision, _ = decide(ins, honest(ins), policy, GateHistory(halted=True), np.random.default_rng(0))
    assert decision.rule == "halted"


def test_canary_bytes_in_weights_do_not_survive_noise(policy: Policy) -> None:
    ins = instruction()
    decision, content = decide(ins, ATTACKS["bytes-in-weights"](ins), policy, GateHistory(), np.random.default_rng(1))
    assert decision.sent and content is not None
    from fedgate.gate.pipeline import content_bytes

    assert CANARY not in content_bytes(content)


def test_a_reply_the_rules_cannot_read_is_refused_not_crashed(policy: Policy) -> None:
    from flwr.app import Message, RecordDict

    ins = instruction()
    empty = Message(RecordDict(), reply_to=ins)
    empty.__dict__["_content"] = None  # neither content nor error: nothing the rules can read
    decision, content = decide(ins, empty, policy, GateHistory(), np.random.default_rng(0))
    assert content is None and not decision.sent
    assert decision.rule == "gate-error"
