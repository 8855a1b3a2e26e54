"""Flower's legacy FitIns/FitRes layout, which SecAgg+ speaks, to and from the layout the gate's
rules read, in trusted code over bytes.

    server -> gate      fitins.parameters, fitins.config, secaggplus_configs
    gate -> ClientApp   fitins.parameters, fitins.config                       (the plain instruction)
    ClientApp -> gate   fitres.parameters, fitres.num_examples, fitres.metrics, fitres.status
    rules read          <model record>: typed ArrayRecord, "metrics": MetricRecord (num-examples in it)
    gate -> server      fitres.* with an empty fitres.parameters, the gate's metrics and
                        num_examples, a fixed status, and secaggplus_configs: the masked vector

Legacy arrays declare no dtype and no shape (Flower's `parameters_to_arrayrecord`); here they get
the ones their .npy header states, and `gate.decode` then checks every byte against them. A
ClientApp's status message is never forwarded (free text is a channel); its metrics must be plain
numbers, and then pass the gate's allow-list and quantisation like any reply's."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedgate.errors import GateRefusal
from fedgate.flower_adapter import (
    LEGACY_FIT,
    SECAGG_CONFIGS,
    SecAggKey,
    message_from_bytes,
    message_to_bytes,
    message_with_content,
)
from fedgate.gate.rules import NUM_EXAMPLES

OK = 0
NUMPY_STYPE = "numpy.ndarray"  # Flower's serialisation type of a .npy tensor (the only one the gate reads)
_STATUS = {"code": OK, "message": ""}
_INSTRUCTION_RECORDS = {LEGACY_FIT["ins_parameters"]: ArrayRecord, LEGACY_FIT["ins_config"]: ConfigRecord}
_REPLY_RECORDS = {
    LEGACY_FIT["res_parameters"]: ArrayRecord,
    LEGACY_FIT["res_num_examples"]: MetricRecord,
    LEGACY_FIT["res_metrics"]: ConfigRecord,
    LEGACY_FIT["res_status"]: ConfigRecord,
}
MODEL_KEY = LEGACY_FIT["ins_parameters"]
"""The gate's rules see the model under the instruction's record name."""


def _typed(name: str, array: Array) -> Array:
    """A legacy Array with the dtype and shape its own .npy header declares (checked again,
    with its length, by `gate.decode`)."""
    if array.stype != NUMPY_STYPE or not isinstance(array.data, bytes):
        raise GateRefusal("legacy-layout", f"tensor {name!r} is not a serialised numpy array", key=name)
    header = io.BytesIO(array.data[:4096])
    try:
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(header, max_header_size=4096)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(header, max_header_size=4096)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, OSError, SyntaxError) as err:
        raise GateRefusal("legacy-layout", f"tensor {name!r} is not a plain .npy: {err}", key=name) from err
    return Array(dtype=str(dtype), shape=tuple(int(d) for d in shape), stype=NUMPY_STYPE, data=array.data)


def _typed_record(record: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({name: _typed(name, array) for name, array in record.items()})


def split_instruction(message: Message) -> tuple[Message, Message, ConfigRecord]:
    """(the plain instruction for the ClientApp, the instruction the gate's rules read, the
    SecAgg+ record), from a collect-stage message. Any record beyond the legacy layout is refused."""
    content = message.content
    records = {name: record for name, record in content.items() if name != SECAGG_CONFIGS}
    if set(records) != set(_INSTRUCTION_RECORDS) or any(
        not isinstance(records[k], t) for k, t in _INSTRUCTION_RECORDS.items()
    ):
        raise GateRefusal("legacy-layout", f"a SecAgg+ fit instruction holds {sorted(content)}")
    secagg = content[SECAGG_CONFIGS]
    if not isinstance(secagg, ConfigRecord):
        raise GateRefusal("legacy-layout", "the SecAgg+ record is not a ConfigRecord")
    plain = message_with_content(message, RecordDict(dict(records)))
    model = cast(ArrayRecord, records[MODEL_KEY])
    typed = RecordDict({MODEL_KEY: _typed_record(model), LEGACY_FIT["ins_config"]: records[LEGACY_FIT["ins_config"]]})
    return plain, message_with_content(message, typed), secagg


def reply_for_rules(raw: bytes) -> bytes:
    """The ClientApp's legacy fit reply as the reply the gate's rules read. A reply with an error
    passes unchanged (the rules refuse it); any other deviation from the layout is refused here."""
    message = message_from_bytes(raw)
    if message.has_error():
        return raw
    if not message.has_content():
        raise GateRefusal("legacy-layout", "the ClientApp's reply carries no content")
    content = message.content
    if set(content) != set(_REPLY_RECORDS) or any(not isinstance(content[k], t) for k, t in _REPLY_RECORDS.items()):
        raise GateRefusal(
            "legacy-layout", f"a legacy fit reply holds {sorted(content)}, expected {sorted(_REPLY_RECORDS)}"
        )
    status = content[LEGACY_FIT["res_status"]]
    if set(status) != {"code", "message"} or type(status["code"]) is not int:
        raise GateRefusal("legacy-layout", "the reply's status is malformed")
    if status["code"] != OK:
        raise GateRefusal("client-error", "the ClientApp reported a failed fit", code=status["code"])
    examples = content[LEGACY_FIT["res_num_examples"]]
    if list(examples) != ["num_examples"] or type(examples["num_examples"]) is not int:
        raise GateRefusal("legacy-layout", "fitres.num_examples must hold one integer num_examples")
    metrics: dict[str, Any] = {}
    for key, value in content[LEGACY_FIT["res_metrics"]].items():
        if type(value) not in (int, float):
            raise GateRefusal("metric-type", f"metric {key!r} must be one number, got {type(value).__name__}", key=key)
        metrics[str(key)] = value
    if NUM_EXAMPLES in metrics:
        raise GateRefusal("legacy-layout", f"{NUM_EXAMPLES!r} is reported in num_examples, not as a metric")
    metrics[NUM_EXAMPLES] = int(examples["num_examples"])
    typed = RecordDict(
        {
            MODEL_KEY: _typed_record(cast(ArrayRecord, content[LEGACY_FIT["res_parameters"]])),
            "metrics": MetricRecord(metrics),
        }
    )
    return message_to_bytes(message_with_content(message, typed))


def masked_reply(masked: bytes, metrics: Mapping[str, int | float]) -> RecordDict:
    """What leaves at the collect stage: nothing of the update in the clear, the gate's own
    quantised metrics and num_examples, a fixed status, and the masked vector."""
    clear = {k: v for k, v in metrics.items() if k != NUM_EXAMPLES}
    return RecordDict(
        {
            LEGACY_FIT["res_parameters"]: ArrayRecord(),
            LEGACY_FIT["res_num_examples"]: MetricRecord({"num_examples": int(metrics[NUM_EXAMPLES])}),
            LEGACY_FIT["res_metrics"]: ConfigRecord(dict(clear)),  # type: ignore[arg-type]
            LEGACY_FIT["res_status"]: ConfigRecord(dict(_STATUS)),  # type: ignore[arg-type]
            SECAGG_CONFIGS: ConfigRecord({SecAggKey.MASKED_PARAMETERS: [masked]}),
        }
    )


__all__ = ["MODEL_KEY", "masked_reply", "reply_for_rules", "split_instruction"]
