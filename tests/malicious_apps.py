"""ClientApps written to get data past the gate, each a different route. Used by the gate's
unit tests (called directly) and by the simulation (and later deployment) runs, where
hospital i plays the attack named at position i of the run config's `attacks`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

CANARY = b"CANARY:patient-0042:J.Doe:1961-04-07"
CANARY_TEXT = CANARY.decode()


def _model(instruction: Message) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in instruction.content["arrays"].items()}


def _trained(instruction: Message, scale: float = 0.01) -> dict[str, np.ndarray]:
    tensors = _model(instruction)
    rng = np.random.default_rng(0)
    return {
        k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
        for k, v in tensors.items()
    }


def _arrays(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})


def _reply(instruction: Message, records: dict[str, object]) -> Message:
    return Message(RecordDict(records), reply_to=instruction)  # type: ignore[arg-type]


def _honest_records(instruction: Message) -> dict[str, object]:
    if instruction.metadata.message_type == "evaluate":
        return {"metrics": MetricRecord({"eval-loss": 0.5, "eval-acc": 0.8, "num-examples": 120})}
    return {
        "arrays": _arrays(_trained(instruction)),
        "metrics": MetricRecord({"train-loss": 0.4321, "num-examples": 123}),
    }


def honest(instruction: Message) -> Message:
    return _reply(instruction, _honest_records(instruction))


def extra_array_record(instruction: Message) -> Message:
    image = np.frombuffer(CANARY, dtype=np.uint8)
    return _reply(instruction, {**_honest_records(instruction), "scan": ArrayRecord({"pixels": Array(image)})})


def config_record_with_image_bytes(instruction: Message) -> Message:
    return _reply(
        instruction, {**_honest_records(instruction), "extra": ConfigRecord({"image": CANARY, "note": CANARY_TEXT})}
    )


def metric_carrying_a_string(instruction: Message) -> Message:
    # MetricRecord only holds numbers, so the string rides in the metric's name.
    return _reply(
        instruction, {**_honest_records(instruction), "metrics": MetricRecord({CANARY_TEXT: 1.0, "num-examples": 5})}
    )


def metric_not_on_allow_list(instruction: Message) -> Message:
    records = _honest_records(instruction)
    return _reply(instruction, {**records, "metrics": MetricRecord({"mean-patient-age": 61.5, "num-examples": 5})})


def metric_list_value(instruction: Message) -> Message:
    records = _honest_records(instruction)
    return _reply(instruction, {**records, "metrics": MetricRecord({"train-loss": [float(b) for b in CANARY]})})


def metrics_under_another_name(instruction: Message) -> Message:
    records = _honest_records(instruction)
    return _reply(instruction, {"arrays": records["arrays"], CANARY_TEXT: records["metrics"]})


def float64_instead_of_float32(instruction: Message) -> Message:
    tensors = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in _trained(instruction).items()}
    return _reply(instruction, {"arrays": _arrays(tensors), "metrics": MetricRecord({"num-examples": 10})})


def changed_shape(instruction: Message) -> Message:
    tensors = _trained(instruction)
    name = next(k for k, v in tensors.items() if v.dtype.kind == "f" and v.size > 1)
    tensors[name] = tensors[name].reshape(-1)
    return _reply(instruction, {"arrays": _arrays(tensors), "metrics": MetricRecord({"num-examples": 10})})


def added_tensor(instruction: Message) -> Message:
    tensors = {**_trained(instruction), "leak": np.frombuffer(CANARY, dtype=np.uint8).astype(np.float32)}
    return _reply(instruction, {"arrays": _arrays(tensors), "metrics": MetricRecord({"num-examples": 10})})


def nan_in_update(instruction: Message) -> Message:
    tensors = _trained(instruction)
    name = next(k for k, v in tensors.items() if v.dtype.kind == "f")
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    return _reply(instruction, {"arrays": _arrays(tensors), "metrics": MetricRecord({"num-examples": 10})})


def huge_norm(instruction: Message) -> Message:
    return _reply(
        instruction,
        {"arrays": _arrays(_trained(instruction, scale=1e4)), "metrics": MetricRecord({"num-examples": 10})},
    )


def bytes_in_the_weights(instruction: Message) -> Message:
    """Writes the canary into the first weights' bytes: the update channel itself."""
    tensors = _trained(instruction)
    name = next(k for k, v in tensors.items() if v.dtype == np.float32 and v.size * 4 >= len(CANARY) + 4)
    raw = bytearray(tensors[name].tobytes())
    raw[: len(CANARY)] = CANARY
    tensors[name] = np.frombuffer(bytes(raw), dtype=np.float32).reshape(tensors[name].shape).copy()
    tensors[name][~np.isfinite(tensors[name])] = 0.0
    return _reply(instruction, {"arrays": _arrays(tensors), "metrics": MetricRecord({"num-examples": 10})})


def reply_to_another_message(instruction: Message) -> Message:
    reply = honest(instruction)
    reply.metadata.__dict__["_reply_to_message_id"] = "f" * 64  # answers a message never sent
    return reply


def raises_with_data(instruction: Message) -> Message:
    raise RuntimeError(f"cannot train on {CANARY_TEXT}")


def changed_integer_tensor(instruction: Message) -> Message:
    tensors = _trained(instruction)
    name = next(k for k, v in tensors.items() if v.dtype.kind in "iu")
    tensors[name] = tensors[name] + 1_000_000
    return _reply(instruction, {"arrays": _arrays(tensors), "metrics": MetricRecord({"num-examples": 10})})


ATTACKS: dict[str, Callable[[Message], Message]] = {
    "honest": honest,
    "extra-array-record": extra_array_record,
    "config-record": config_record_with_image_bytes,
    "metric-string": metric_carrying_a_string,
    "metric-not-allowed": metric_not_on_allow_list,
    "metric-list": metric_list_value,
    "metrics-renamed": metrics_under_another_name,
    "float64": float64_instead_of_float32,
    "changed-shape": changed_shape,
    "added-tensor": added_tensor,
    "nan": nan_in_update,
    "huge-norm": huge_norm,
    "bytes-in-weights": bytes_in_the_weights,
    "wrong-reply-to": reply_to_another_message,
    "raises": raises_with_data,
    "integer-tensor": changed_integer_tensor,
}

# What the gate does with each attack, in either executor (the tests of both share this).
ATTACK_RULES: dict[str, str | None] = {
    "honest": None,
    "extra-array-record": "extra-record",
    "config-record": "config-record",
    "metric-string": "metric-not-allowed",
    "float64": "manifest",
    "changed-shape": "manifest",
    "added-tensor": "manifest",
    "nan": "non-finite",
    "huge-norm": None,  # clipped, then sent
    "bytes-in-weights": None,  # sent, but clipped and noised
    "wrong-reply-to": "reply-mismatch",
    "raises": "client-error",
    "metrics-renamed": "extra-record",
}

# Attacks whose refusals take different paths through an executor (a record refused, bytes in the
# weights clipped and noised then sent, a reply to another message, an app that raises with data):
# the end-to-end tests' default run. tests/gate/test_rules.py plays every attack through the gate;
# the slow run plays them all at once in each executor.
SOME_ATTACKS = ["honest", "config-record", "bytes-in-weights", "wrong-reply-to", "raises"]


def check_refusals(summary: dict[str, Any], attacks: list[str]) -> None:
    """Hospital i played attacks[i] on both of its train messages (rounds 1 and 2)."""
    for index, attack in enumerate(attacks):
        hospital = f"hospital-{index}"
        expected = ATTACK_RULES[attack]
        refusals = summary["refusals"].get(hospital, [])
        if expected is None:
            assert not refusals, (attack, refusals)
            assert summary["egress"][hospital]["replies_sent"] == 3
        else:  # both train replies refused by the rule; the honest evaluate reply went out
            assert [(r["round"], r["rule"]) for r in refusals] == [(1, expected), (2, expected)], (attack, refusals)
            assert summary["egress"][hospital]["replies_sent"] == 1


app = ClientApp()


def _dispatch(msg: Message, context: Context) -> Message:
    """Attacks are played on train messages; evaluate replies stay honest, so each hospital's
    refusals name exactly one rule."""
    attacks = str(context.run_config.get("attacks", "honest")).split(",")
    attack = attacks[int(context.node_config["partition-id"]) % len(attacks)]
    if msg.metadata.message_type != "train":
        return honest(msg)
    if attack == "sandbox-escape":  # tries fedgate's escape suite; its answer is refused, kept locally
        from fedgate.sandbox import escapes

        return escapes._train(msg, context)  # type: ignore[no-any-return]
    return ATTACKS[attack](msg)


app.train()(_dispatch)
app.evaluate()(_dispatch)
