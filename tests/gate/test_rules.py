"""Every malicious route is refused with its rule named (or, for the norm, clipped), and every
malicious server input is a recorded refusal, not a crash. Through the real seam: bytes in,
bytes out, one gate per test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from conftest import gate_for, instruction, through_gate
from fedgate.canonical import canonical_json
from fedgate.flower_adapter import message_to_bytes, recorddict_to_bytes
from fedgate.gate.manifest import Manifest
from fedgate.gate.update import effective_norm, grid_step
from malicious_apps import ATTACK_RULES, ATTACKS, CANARY, honest
from model_fixtures import array_record, tiny_model

REFUSED = {name: rule for name, rule in ATTACK_RULES.items() if rule is not None}


@pytest.mark.parametrize(("attack", "rule"), sorted({**REFUSED, "metric-not-allowed": "metric-not-allowed",
                                                      "metric-list": "metric-type"}.items()))  # fmt: skip
def test_each_attack_is_refused_by_its_rule(tmp_path: Path, attack: str, rule: str) -> None:
    out = through_gate(gate_for(tmp_path), instruction(), ATTACKS[attack])
    assert not out.decision.sent and out.decision.rule == rule, out.decision.reason
    assert out.decision.stages[-1].stage == rule and not out.decision.stages[-1].passed
    assert out.message is not None and out.message.has_error()
    canonical_json(out.decision.to_json())  # evidence must be hashable as is


def test_manifest_refusal_says_what_differs(tmp_path: Path) -> None:
    out = through_gate(gate_for(tmp_path), instruction(), ATTACKS["added-tensor"])
    assert out.decision.detail["diff"]["added"] == ["leak"]
    out = through_gate(gate_for(tmp_path / "b"), instruction(), ATTACKS["float64"])
    assert out.decision.detail["diff"]["changed"]["conv.weight"] == {
        "declared": ["float32", [4, 1, 3, 3]],
        "got": ["float64", [4, 1, 3, 3]],
    }


def _sent_update_norm(ins: Message, out_message: Message) -> float:
    before = {k: a.numpy() for k, a in ins.content["arrays"].items()}
    after = {k: a.numpy() for k, a in out_message.content["arrays"].items()}
    return math.sqrt(sum(float(np.sum((after[k].astype(np.float64) - before[k]) ** 2)) for k in after))


def test_huge_norm_is_clipped_not_refused(tmp_path: Path) -> None:
    ins = instruction()
    out = through_gate(gate_for(tmp_path, noise_multiplier=0.0), ins, ATTACKS["huge-norm"])
    assert out.decision.sent and out.message is not None, out.decision.reason
    update = next(s for s in out.decision.stages if s.stage == "update")
    assert float(update.detail["norm"]) > 1e3 and update.detail["clipped"] is True
    assert _sent_update_norm(ins, out.message) == pytest.approx(1.0, rel=1e-5)
    assert "update-clipped" in out.decision.warnings


def test_honest_reply_is_rebuilt_with_canonical_metrics(tmp_path: Path) -> None:
    ins = instruction()
    gate = gate_for(tmp_path)
    out = through_gate(gate, ins, honest)
    assert out.decision.sent and out.message is not None, out.decision.reason
    content = out.message.content
    assert list(content.keys()) == ["arrays", "metrics"]
    sent_manifest = Manifest.of_arrays({k: a.numpy() for k, a in content["arrays"].items()})
    assert sent_manifest == Manifest.of_arrays(tiny_model())
    # sorted, every allow-listed train metric present, quantised; num-examples bucketed
    assert list(content["metrics"].keys()) == ["num-examples", "train-loss"]
    assert dict(content["metrics"]) == {"train-loss": pytest.approx(0.43), "num-examples": 100}
    assert content["arrays"]["steps"].numpy().tolist() == [3]  # integer tensors pass unchanged
    d = sum(v.size for v in tiny_model().values() if v.dtype.kind == "f")
    c_eff = effective_norm(1.0, grid_step(0.01, 1.0, d), d)
    bound = out.decision.bound
    assert bound.update_bits == pytest.approx(c_eff**2 / (2 * 0.01**2 * math.log(2)))
    assert bound.metric_bits == pytest.approx(math.log2(1001) + math.log2(1000))
    assert bound.timing_bits == pytest.approx(math.log2(gate.policy.release.max_slots + 1))
    assert bound.total == pytest.approx(bound.update_bits + bound.metric_bits + 1 + bound.timing_bits)


def test_a_missing_metric_is_sent_as_its_placeholder_so_presence_carries_nothing(tmp_path: Path) -> None:
    ins = instruction()

    def quiet(msg: Message) -> Message:
        reply = honest(msg)
        return Message(RecordDict({"arrays": reply.content["arrays"], "metrics": MetricRecord({})}), reply_to=msg)

    out = through_gate(gate_for(tmp_path), ins, quiet)
    assert out.message is not None and dict(out.message.content["metrics"]) == {"num-examples": 100, "train-loss": 0.0}


def test_metric_key_order_does_not_leave(tmp_path: Path) -> None:
    ins = instruction("evaluate")
    orders = []
    for i, keys in enumerate((("eval-acc", "eval-loss"), ("eval-loss", "eval-acc"))):

        def ordered(msg: Message, keys: tuple[str, ...] = keys) -> Message:
            values = {"eval-acc": 0.8, "eval-loss": 0.5}
            return Message(RecordDict({"metrics": MetricRecord({k: values[k] for k in keys})}), reply_to=msg)

        out = through_gate(gate_for(tmp_path / str(i)), ins, ordered)
        assert out.message is not None
        orders.append(list(out.message.content["metrics"].keys()))
    assert orders[0] == orders[1] == ["eval-acc", "eval-loss", "num-examples"]


def test_evaluate_reply_may_not_carry_arrays(tmp_path: Path) -> None:
    ins = instruction("evaluate")

    def sneaky(msg: Message) -> Message:
        return Message(RecordDict({"arrays": array_record(tiny_model()), "metrics": MetricRecord({"eval-acc": 0.9})}),
                       reply_to=msg)  # fmt: skip

    assert through_gate(gate_for(tmp_path), ins, sneaky).decision.rule == "extra-record"
    out = through_gate(gate_for(tmp_path / "b"), ins, honest)
    assert out.decision.sent and out.message is not None and list(out.message.content.keys()) == ["metrics"]
    assert out.decision.bound.update_bits == 0.0


def test_query_messages_are_refused_unless_allowed(tmp_path: Path) -> None:
    assert through_gate(gate_for(tmp_path), instruction("query"), honest).decision.rule == "message-type"


def test_canary_bytes_in_weights_do_not_survive_noise(tmp_path: Path) -> None:
    out = through_gate(gate_for(tmp_path), instruction(), ATTACKS["bytes-in-weights"])
    assert out.decision.sent and out.message is not None
    assert CANARY not in recorddict_to_bytes(out.message.content)


def test_a_reply_that_is_not_a_message_is_refused_not_crashed(tmp_path: Path) -> None:
    out = through_gate(gate_for(tmp_path), instruction(), b"\x0a\xff garbage that is not protobuf")
    assert not out.decision.sent and out.decision.rule in ("reply-unreadable", "gate-error")


def test_the_reply_is_read_from_its_bytes_not_from_an_object(tmp_path: Path) -> None:
    """A ClientApp's own ndarray subclass (whose norm is 0 and that ignores noise) or dict
    never reaches a rule: the sandbox hands back bytes, and the gate decodes them itself."""

    class Lying(np.ndarray):
        def __sub__(self, other: object) -> np.ndarray:  # type: ignore[override]
            return np.zeros(self.shape, dtype=self.dtype)

    ins = instruction()

    def lying(msg: Message) -> Message:
        trained = {k: (v + 50.0).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in tiny_model().items()}
        arrays = {k: v.view(Lying) if v.dtype.kind == "f" else v for k, v in trained.items()}
        return Message(RecordDict({"arrays": array_record(arrays), "metrics": MetricRecord({})}), reply_to=msg)

    out = through_gate(gate_for(tmp_path, noise_multiplier=0.0), ins, lying)
    assert out.decision.sent and out.message is not None
    assert _sent_update_norm(ins, out.message) == pytest.approx(1.0, rel=1e-5)  # measured, then clipped


# -- a malicious server gets refusals, not crashes ---------------------------------------------


def _server_instruction(records: dict[str, object], message_type: str = "train") -> Message:
    from fedgate.flower_adapter import make_instruction

    return make_instruction(RecordDict(records), message_type, dst_node_id=17)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "records",
    [
        {"arrays": array_record({"w": np.array([np.nan, 1.0], dtype=np.float32)})},
        {"arrays": array_record({"w": np.array([np.inf], dtype=np.float32)})},
        {"arrays": array_record(tiny_model()), "second": array_record(tiny_model())},
        {"config": ConfigRecord({"server-round": 1})},
    ],
    ids=["nan-model", "inf-model", "two-models", "no-model"],
)
def test_malicious_instructions_are_refused_before_any_code_runs(tmp_path: Path, records: dict[str, object]) -> None:
    ran = []

    def app(msg: Message) -> Message:
        ran.append(1)
        return honest(msg)

    out = through_gate(gate_for(tmp_path), _server_instruction(records), app)
    assert not out.decision.sent and out.decision.rule == "instruction", out.decision.reason
    assert ran == []
    assert out.message is not None and out.message.has_error()


@pytest.mark.parametrize("server_round", ["ninety-nine", 99.5, -1, 10**18])
def test_any_server_round_is_recorded_not_trusted(tmp_path: Path, server_round: object) -> None:
    gate = gate_for(tmp_path)
    out = through_gate(gate, instruction(server_round=server_round), honest)
    assert out.decision.sent, out.decision.reason
    entry = gate.ledger.entries()[out.seq]
    assert entry["gate_round"] == 1 and entry["instruction"]["server_round"] == repr(server_round)


def test_a_renamed_model_record_is_followed_not_trusted(tmp_path: Path) -> None:
    ins = _server_instruction({"weights": array_record(tiny_model()), "config": ConfigRecord({"server-round": 1})})

    def app(msg: Message) -> Message:
        return Message(RecordDict({"weights": msg.content["weights"], "metrics": MetricRecord({})}),
                       reply_to=msg)  # fmt: skip

    out = through_gate(gate_for(tmp_path), ins, app)
    assert out.decision.sent and out.message is not None and next(iter(out.message.content.keys())) == "weights"

    def old_name(msg: Message) -> Message:
        return Message(RecordDict({"arrays": msg.content["weights"], "metrics": MetricRecord({})}), reply_to=msg)

    assert through_gate(gate_for(tmp_path / "b"), ins, old_name).decision.rule == "extra-record"


def test_instruction_bytes_are_what_the_gate_checks(tmp_path: Path) -> None:
    """The instruction the gate clips against is decoded from the bytes it received; what
    the ClientApp does to its own copy changes nothing."""
    ins = instruction()
    raw = message_to_bytes(ins)

    def edits_its_copy(msg: Message) -> Message:
        payload = np.frombuffer(CANARY * 4, dtype=np.float32)[:36].copy()
        for name, array in msg.content["arrays"].items():
            if array.dtype == "float32" and array.numpy().size == 36:
                msg.content["arrays"][name] = type(array)(payload.reshape(array.numpy().shape))
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({})}), reply_to=msg)

    gate = gate_for(tmp_path, noise_multiplier=0.0)
    out = through_gate(gate, ins, edits_its_copy)
    assert out.decision.sent
    assert message_to_bytes(ins) == raw  # the test's own object
    norm = float(next(s for s in out.decision.stages if s.stage == "update").detail["norm"])
    assert norm > 1.0  # measured against the server's model, so the payload shows up as a big update and is clipped
