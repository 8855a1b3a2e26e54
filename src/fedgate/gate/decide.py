"""The gate's rules as one pure function: (instruction, reply, policy, history) ->
(decision, outgoing content). No I/O, no clock: the pipeline around it records and sends.

Nothing of the reply is forwarded as is. The outgoing content is rebuilt from values the
rules have checked and transformed: fresh Arrays from the noised update, a fresh
MetricRecord of quantised allow-listed values, under record names the instruction chose."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedgate.canonical import decimal_str
from fedgate.errors import GateRefusal
from fedgate.gate.evidence import Bound, GateDecision, StageEvidence
from fedgate.gate.manifest import Manifest
from fedgate.gate.update import add_noise, capacity_bits, clip
from fedgate.policy import Policy

METRICS_RECORD = "metrics"
NUM_EXAMPLES = "num-examples"
REFUSED_BOUND = Bound(update_bits=0.0, metric_bits=0.0)


@dataclass(frozen=True)
class GateHistory:
    """What the gate remembers of earlier replies of this run (derived from the ledger)."""

    pinned_manifest: str = ""
    cumulative_bits: float = 0.0
    halted: bool = False


def message_category(message: Message) -> str:
    return message.metadata.message_type.split(".", 1)[0]


def _decode(record: ArrayRecord, manifest: Manifest) -> dict[str, np.ndarray]:
    """Decode every Array and check that the bytes say what the metadata declares."""
    arrays: dict[str, np.ndarray] = {}
    for spec in manifest.tensors:
        array = record[spec.name]
        try:
            value = array.numpy()
        except Exception as err:  # wrong stype, corrupt or pickled bytes: all refused alike
            raise GateRefusal(
                "array-encoding", f"tensor {spec.name!r} cannot be decoded: {err}", key=spec.name
            ) from err
        if str(value.dtype) != spec.dtype or tuple(value.shape) != spec.shape:
            raise GateRefusal(
                "array-encoding",
                f"tensor {spec.name!r} declares {spec.dtype}{list(spec.shape)} "
                f"but holds {value.dtype}{list(value.shape)}",
                key=spec.name,
            )
        arrays[spec.name] = value
    return arrays


def _check_records(instruction: Message, reply: Message, category: str) -> tuple[str, StageEvidence]:
    """Only the records a reply of this type may have, under the names the instruction used."""
    array_keys = list(instruction.content.array_records) if instruction.has_content() else []
    allowed_array_key = array_keys[0] if category == "train" and len(array_keys) == 1 else None
    if category == "train" and allowed_array_key is None:
        raise GateRefusal("instruction", f"a train instruction must carry exactly one ArrayRecord, it has {array_keys}")
    seen: list[str] = []
    for name, record in reply.content.items():
        if isinstance(record, ConfigRecord):
            raise GateRefusal(
                "config-record", f"reply carries ConfigRecord {name!r}; no ConfigRecord may leave", key=name
            )
        if isinstance(record, ArrayRecord):
            if name != allowed_array_key:
                raise GateRefusal(
                    "extra-record", f"reply carries ArrayRecord {name!r}, not allowed in a {category} reply", key=name
                )
        elif isinstance(record, MetricRecord):
            if name != METRICS_RECORD:
                raise GateRefusal(
                    "extra-record", f"MetricRecord must be named {METRICS_RECORD!r}, got {name!r}", key=name
                )
        else:
            raise GateRefusal("extra-record", f"reply carries a record of type {type(record).__name__}", key=name)
        seen.append(name)
    if allowed_array_key is not None and allowed_array_key not in seen:
        raise GateRefusal(
            "manifest", f"train reply lacks the model ArrayRecord {allowed_array_key!r}", key=allowed_array_key
        )
    return allowed_array_key or "", StageEvidence("records", True, {"records": sorted(seen)})


def _quantise_metrics(
    reply: Message, policy: Policy, warnings: list[str]
) -> tuple[dict[str, int | float], StageEvidence, float]:
    rules = policy.metric_rules
    record = reply.content.metric_records.get(METRICS_RECORD)
    out: dict[str, int | float] = {}
    detail: dict[str, Any] = {}
    bits = 0.0
    for key, value in (record or {}).items():
        if key != NUM_EXAMPLES and key not in rules:
            raise GateRefusal("metric-not-allowed", f"metric {key!r} is not on the policy's allow-list", key=key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GateRefusal("metric-type", f"metric {key!r} must be one number, got {type(value).__name__}", key=key)
        if not math.isfinite(value):
            raise GateRefusal("non-finite", f"metric {key!r} is {value}", key=key)
        if key == NUM_EXAMPLES:
            out[key] = policy.num_examples.quantise(int(value))
            bits += math.log2(policy.num_examples.levels)
            if policy.num_examples.mode == "bucket" and value > policy.num_examples.max:
                warnings.append(f"metric-clipped:{key}")
        else:
            out[key] = rules[key].quantise(float(value))
            bits += math.log2(rules[key].levels)
            if not rules[key].min <= value <= rules[key].max:
                warnings.append(f"metric-clipped:{key}")
        detail[key] = {"sent": decimal_str(float(out[key])), "original": decimal_str(float(value))}
    return out, StageEvidence("metrics", True, detail), bits


def decide(
    instruction: Message,
    reply: Message,
    policy: Policy,
    history: GateHistory,
    generator: np.random.Generator,
) -> tuple[GateDecision, RecordDict | None]:
    """Apply every rule. Returns the decision and, when sent, the content to send."""
    category = message_category(instruction)
    stages: list[StageEvidence] = []
    warnings: list[str] = []
    manifest_hash = ""
    try:
        if history.halted:
            raise GateRefusal("halted", "an earlier reply of this run was refused and the policy says halt")
        if category not in policy.allowed_types:
            raise GateRefusal(
                "message-type", f"the policy does not allow replies to {category!r} messages", type=category
            )
        if reply.has_error():
            raise GateRefusal("client-error", f"the ClientApp failed: {reply.error.reason}", code=reply.error.code)
        if reply.metadata.reply_to_message_id != instruction.metadata.message_id:
            raise GateRefusal(
                "reply-mismatch",
                "reply does not answer the instruction it was given",
                reply_to=reply.metadata.reply_to_message_id,
                instruction=instruction.metadata.message_id,
            )
        if reply.metadata.message_type != instruction.metadata.message_type:
            raise GateRefusal(
                "reply-mismatch",
                f"reply type {reply.metadata.message_type!r} does not match "
                f"instruction type {instruction.metadata.message_type!r}",
            )
        stages.append(StageEvidence("envelope", True, {"type": instruction.metadata.message_type}))

        array_key, records = _check_records(instruction, reply, category)
        stages.append(records)
        metrics, metric_stage, metric_bits = _quantise_metrics(reply, policy, warnings)

        content = RecordDict()
        update_bits = 0.0
        if array_key:
            declared = Manifest.of(instruction.content.array_records[array_key])
            manifest_hash = declared.hash
            expected = policy.approved_manifest or history.pinned_manifest
            if expected and declared.hash != expected:
                raise GateRefusal(
                    "manifest-not-approved",
                    "the server's model is not the approved / pinned model",
                    declared=declared.hash,
                    expected=expected,
                )
            got = Manifest.of(reply.content.array_records[array_key])
            if got != declared:
                raise GateRefusal("manifest", "reply tensors differ from the declared model", diff=declared.diff(got))
            stages.append(StageEvidence("manifest", True, {"hash": declared.hash, "tensors": len(declared.tensors)}))
            global_arrays = _decode(instruction.content.array_records[array_key], declared)
            reply_arrays = _decode(reply.content.array_records[array_key], declared)
            for name, value in reply_arrays.items():
                if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
                    raise GateRefusal("non-finite", f"tensor {name!r} holds NaN or Inf", key=name)
                if value.dtype.kind not in "fc" and not np.array_equal(value, global_arrays[name]):
                    raise GateRefusal(
                        "integer-tensor",
                        f"non-float tensor {name!r} changed; only float tensors may be trained",
                        key=name,
                    )
            floats = [s.name for s in declared.tensors if np.dtype(s.dtype).kind == "f"]
            update = {n: reply_arrays[n].astype(np.float64) - global_arrays[n].astype(np.float64) for n in floats}
            clipped, norm, scale = clip(update, policy.clip_norm)
            if scale < 1.0:
                warnings.append("update-clipped")
            stages.append(
                StageEvidence(
                    "clip",
                    True,
                    {
                        "norm": decimal_str(norm),
                        "scale": decimal_str(scale),
                        "clip_norm": decimal_str(policy.clip_norm),
                    },
                )
            )
            sigma = policy.sigma
            noised = add_noise(clipped, sigma, generator)
            stages.append(StageEvidence("noise", True, {"sigma": decimal_str(sigma), "mode": policy.noise_mode}))
            update_bits = capacity_bits(policy.clip_norm, sigma)
            out = OrderedDict()
            for spec in declared.tensors:
                value = global_arrays[spec.name]
                if spec.name in noised:
                    value = (global_arrays[spec.name].astype(np.float64) + noised[spec.name]).astype(spec.dtype)
                out[spec.name] = Array(np.ascontiguousarray(value))
            content[array_key] = ArrayRecord(out)

        stages.append(metric_stage)
        bound = Bound(update_bits=update_bits, metric_bits=metric_bits)
        if policy.max_total_bits and history.cumulative_bits + bound.total > policy.max_total_bits:
            raise GateRefusal(
                "budget",
                f"sending would bring the bound to {history.cumulative_bits + bound.total:.1f} bits, "
                f"over the policy's {policy.max_total_bits:.1f}",
            )
        stages.append(StageEvidence("bound", True, bound.to_json()))
        if metrics:
            content[METRICS_RECORD] = MetricRecord(dict(metrics.items()))
        return GateDecision(True, category, tuple(stages), bound, manifest_hash, warnings=tuple(warnings)), content
    except Exception as err:
        # Fail closed: a reply the rules cannot even read (malformed records, a decoder
        # error, a bug here) is refused and recorded like any other refusal.
        refusal = err if isinstance(err, GateRefusal) else GateRefusal("gate-error", f"{type(err).__name__}: {err}")
        stages.append(StageEvidence(refusal.rule, False, _jsonable(refusal.detail)))
        decision = GateDecision(
            False,
            category,
            tuple(stages),
            REFUSED_BOUND,
            manifest_hash,
            refusal.rule,
            str(refusal),
            _jsonable(refusal.detail),
        )
        return decision, None


def _jsonable(value: Any) -> Any:
    """Refusal details as canonical-JSON-safe values (floats as decimal strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return decimal_str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return repr(value)
