"""The legacy fit layout to and from the gate's: strict, and nothing free-form forwarded."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import FitRes, Status, ndarrays_to_parameters
from flwr.common.typing import Code
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, fitres_to_recorddict

from fedgate.errors import GateRefusal
from fedgate.flower_adapter import SECAGG_CONFIGS, make_instruction, message_from_bytes, message_to_bytes
from fedgate.gate.decode import decode_instruction, decode_reply
from fedgate.secagg.legacy import MODEL_KEY, reply_for_rules, split_instruction

MODEL = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([5], dtype=np.int64)]


def collect_message() -> Message:
    from flwr.common import FitIns

    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(MODEL), {"server-round": 2, "lr": 0.1}), True)
    content[SECAGG_CONFIGS] = ConfigRecord({"stage": "collect_masked_vectors", "ctxts": [b"secret"], "srcs": [3]})
    return make_instruction(content, "train", dst_node_id=7)


def legacy_reply(instruction: Message, **change: object) -> bytes:
    status = Status(Code(change.get("code", 0)), str(change.get("message", "Success")))
    metrics = change.get("metrics", {"train-loss": 0.5})
    fitres = FitRes(status, ndarrays_to_parameters(MODEL), int(change.get("examples", 340)), metrics)  # type: ignore[arg-type]
    content = fitres_to_recorddict(fitres, True)
    for name, record in dict(change.get("extra", {})).items():  # type: ignore[call-overload]
        content[name] = record
    return message_to_bytes(Message(content, reply_to=instruction))


def test_the_client_app_gets_the_plain_instruction_and_the_rules_a_typed_one() -> None:
    message = collect_message()
    plain, for_rules, record = split_instruction(message)
    assert SECAGG_CONFIGS not in plain.content and b"secret" not in message_to_bytes(plain)
    assert plain.metadata.message_id == message.metadata.message_id and record["ctxts"] == [b"secret"]
    instruction = decode_instruction(message_to_bytes(for_rules), ("train",))
    assert instruction.model_key == MODEL_KEY and instruction.server_round == "2"
    assert [t.shape for t in instruction.manifest.tensors] == [(2, 3), (1,)]  # type: ignore[union-attr]
    translated = reply_for_rules(legacy_reply(plain))
    reply = decode_reply(translated, instruction)
    assert reply.metrics == {"train-loss": 0.5, "num-examples": 340}
    np.testing.assert_array_equal(reply.arrays["0"], MODEL[0])


def test_the_client_app_s_status_message_is_never_forwarded() -> None:
    plain, _, _ = split_instruction(collect_message())
    translated = reply_for_rules(legacy_reply(plain, message="patient 4711, born 1961"))
    assert b"4711" not in translated


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"metrics": {"note": "born 1961"}}, "metric-type"),
        ({"metrics": {"train-loss": [0.1, 0.2]}}, "metric-type"),
        ({"metrics": {"num-examples": 9}}, "legacy-layout"),
        ({"code": 3}, "client-error"),
        ({"extra": {"more": MetricRecord({"x": 1.0})}}, "legacy-layout"),
        (
            {"extra": {"fitres.parameters": ArrayRecord({"0": Array(dtype="", shape=(), stype="pickle", data=b"x")})}},
            "legacy-layout",
        ),
    ],
)
def test_a_reply_outside_the_layout_is_refused(change: dict[str, object], rule: str) -> None:
    plain, _, _ = split_instruction(collect_message())
    with pytest.raises(GateRefusal) as err:
        reply_for_rules(legacy_reply(plain, **change))
    assert err.value.rule == rule


def test_an_instruction_with_more_than_the_legacy_layout_is_refused() -> None:
    message = collect_message()
    message.content["extra"] = ConfigRecord({"x": 1})
    with pytest.raises(GateRefusal, match="holds"):
        split_instruction(message_from_bytes(message_to_bytes(message)))
