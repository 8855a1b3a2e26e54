"""Bytes in, plain values out: the instruction as the hospital pulled it and the reply as the
sandbox handed it back, each decoded from its serialised bytes, strictly, into plain NumPy
arrays and Python scalars. No object the ClientApp made ever reaches a rule: not its
Message, not its ndarray subclass, not its dict with a custom `__eq__`.

The bytes are read by `gate.codec` (Flower's wire format, stricter than protobuf): tensors
are read-only views of the message's own bytes, never copied; `Instruction.message` and
`Reply.message` are Flower Messages with the metadata (and error) only, their content left
out, as Flower's `remove_content_from_message` makes them."""

from __future__ import annotations

import ast
import io
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedgate.errors import GateRefusal
from fedgate.flower_adapter import head_of
from fedgate.gate.codec import NUMPY_STYPE, WireArray, WireError, WireMessage, WireRecord, parse_message
from fedgate.gate.manifest import Manifest, TensorSpec

ALLOWED_KINDS = "fiub"  # float, signed and unsigned integer, bool: nothing that holds objects or text
CATEGORIES = ("train", "evaluate", "query")


@dataclass(frozen=True)
class Instruction:
    """The server's instruction as pulled: its exact bytes, its metadata (as a Message with
    the content left out, for the reply's metadata) and the model it carries (read-only
    views of `raw`)."""

    raw: bytes
    message: Message
    category: str
    model_key: str
    model: OrderedDict[str, np.ndarray]
    manifest: Manifest | None
    server_round: str  # as the server sent it: recorded, never trusted

    @property
    def message_id(self) -> str:
        return self.message.metadata.message_id


@dataclass(frozen=True)
class Reply:
    message: Message
    arrays: OrderedDict[str, np.ndarray]
    metrics: dict[str, float | int]
    metric_order: tuple[str, ...]


# The header numpy writes for a plain array, version 1.0, exactly (`np.save`, Flower's Array):
# read without numpy's general parser (a literal_eval of the dict), which costs more than
# the rest of decoding. Anything else goes to numpy's own strict reader.
_DIM = rb"(?:0|[1-9][0-9]{0,18})"
_CANONICAL = re.compile(
    rb"\{'descr': '([<>][fiu][248]|\|[iub]1)', 'fortran_order': (True|False), 'shape': \(("
    + rb"|"
    + _DIM
    + rb",|"
    + _DIM
    + rb"(?:, "
    + _DIM
    + rb")+"
    + rb")\), \} *\n"
)
_MAGIC_1_0 = b"\x93NUMPY\x01\x00"


def _canonical_header(data: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype[Any], int] | None:
    if len(data) < 10 or data[:8] != _MAGIC_1_0:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    if end > len(data) or end % 64:  # numpy aligns the data to 64 bytes
        return None
    match = _CANONICAL.fullmatch(bytes(data[10:end]))
    if match is None:
        return None
    descr, fortran, dims = match.groups()
    shape = tuple(int(d) for d in dims.split(b",") if d.strip())
    return shape, fortran == b"True", np.dtype(descr.decode("ascii")), end


def _numpy_header(name: str, data: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    header = io.BytesIO(data[:4096])
    try:
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(header, max_header_size=4096)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(header, max_header_size=4096)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, OSError, SyntaxError) as err:
        raise GateRefusal("array-encoding", f"tensor {name!r} is not a plain .npy: {err}", key=name) from err
    return tuple(shape), bool(fortran), dtype, header.tell()


def decode_array(name: str, array: Array | WireArray) -> np.ndarray:
    """One Array (Flower's, or as it lies in a message's bytes) to a read-only ndarray over its
    bytes (no copy), after checking that the bytes are a plain .npy of exactly the dtype and
    shape the Array declares."""
    if array.stype != NUMPY_STYPE:
        raise GateRefusal("array-encoding", f"tensor {name!r} is serialised as {array.stype!r}", key=name)
    data = array.data
    if not isinstance(data, (bytes, memoryview)):
        raise GateRefusal("array-encoding", f"tensor {name!r} holds no bytes", key=name)
    parsed = _canonical_header(data)
    if parsed is None:
        parsed = _numpy_header(name, data)
    shape, fortran, dtype, offset = parsed
    if any(type(d) is not int or d < 0 for d in shape):  # numpy reads (-2, -3): 6 values
        raise GateRefusal("array-encoding", f"tensor {name!r} has shape {list(shape)}", key=name)
    if dtype.kind not in ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise GateRefusal("array-encoding", f"tensor {name!r} has dtype {dtype}", key=name)
    if not dtype.isnative:
        raise GateRefusal("array-encoding", f"tensor {name!r} is not in native byte order ({dtype.str})", key=name)
    declared_shape = tuple(int(d) for d in array.shape)
    if str(dtype) != array.dtype or tuple(shape) != declared_shape:
        raise GateRefusal(
            "array-encoding",
            f"tensor {name!r} declares {array.dtype}{list(declared_shape)} but holds {dtype}{list(shape)}",
            key=name,
        )
    count = math.prod(shape)
    if len(data) != offset + count * dtype.itemsize:
        raise GateRefusal("array-encoding", f"tensor {name!r} has {len(data) - offset} data bytes", key=name)
    value = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    value = value.reshape(shape, order="F" if fortran else "C")
    value.flags.writeable = False
    return value


def decode_record(record: ArrayRecord | WireRecord) -> OrderedDict[str, np.ndarray]:
    items = record.items if isinstance(record, WireRecord) else record.items()
    return OrderedDict((name, decode_array(name, array)) for name, array in items)


def _server_round(wire: WireMessage) -> str:
    for record in wire.records("config").values():
        values = record.as_dict()
        if "server-round" in values:
            return repr(values["server-round"])[:64]
    return ""


def _parse(raw: bytes, rule: str, what: str) -> WireMessage:
    try:
        return parse_message(raw)
    except WireError as err:
        raise GateRefusal(rule, f"{what} cannot be read: {err}") from err


METRICS_KEY = "metrics"  # the record of a reply that holds the gate's canonical metrics


def decode_instruction(raw: bytes, allowed_types: tuple[str, ...]) -> Instruction:
    """A malicious server gets refusals, not crashes: anything unreadable, a message type the
    policy does not answer, several or renamed model records, a non-finite model."""
    wire = _parse(raw, "instruction", "the instruction")
    message_type = wire.metadata.message_type
    category = message_type.split(".", 1)[0]
    if category not in CATEGORIES or category not in allowed_types:
        raise GateRefusal("message-type", f"the policy does not answer {message_type!r} messages")
    if wire.content is None:
        raise GateRefusal("instruction", "the instruction carries no content")
    array_records = wire.records("array")
    array_keys = list(array_records)
    if category == "train" and len(array_keys) != 1:
        raise GateRefusal("instruction", f"a train instruction must carry exactly one ArrayRecord, it has {array_keys}")
    model_key = array_keys[0] if category == "train" else ""
    if model_key == METRICS_KEY:  # the reply's metrics take that name: two records of one name, or a lost model
        raise GateRefusal("instruction", f"the model record may not be named {METRICS_KEY!r}, the reply's metrics are")
    model: OrderedDict[str, np.ndarray] = OrderedDict()
    manifest = None
    if model_key:
        try:
            model = decode_record(array_records[model_key])
        except GateRefusal as err:
            raise GateRefusal("instruction", f"the server's model: {err}") from err
        for name, value in model.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise GateRefusal("instruction", f"the server's model holds NaN or Inf in {name!r}", key=name)
        manifest = Manifest(tuple(TensorSpec(n, str(v.dtype), tuple(v.shape)) for n, v in model.items()))
    return Instruction(raw, head_of(wire), category, model_key, model, manifest, _server_round(wire))


def decode_reply(raw: bytes, instruction: Instruction) -> Reply:
    """The reply's bytes to plain values, refusing every record a reply may not carry."""
    wire = _parse(raw, "reply-unreadable", "the reply")
    if wire.error is not None:
        raise GateRefusal("client-error", "the ClientApp answered with an error", code=int(wire.error[0]))
    if wire.metadata.reply_to_message_id != instruction.message_id:
        raise GateRefusal("reply-mismatch", "the reply does not answer the instruction it was given")
    if wire.metadata.message_type != instruction.message.metadata.message_type:
        raise GateRefusal("reply-mismatch", "the reply's message type differs from the instruction's")
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    metrics: dict[str, float | int] = {}
    order: tuple[str, ...] = ()
    for name, record in wire.content or ():
        if record.kind == "config":
            raise GateRefusal("config-record", f"the reply carries ConfigRecord {name!r}; none may leave", key=name)
        if record.kind == "array":
            if name != instruction.model_key or not instruction.model_key:
                raise GateRefusal("extra-record", f"ArrayRecord {name!r} is not allowed in this reply", key=name)
            arrays = decode_record(record)
        else:
            if name != METRICS_KEY:
                raise GateRefusal("extra-record", f"MetricRecord must be named 'metrics', got {name!r}", key=name)
            metrics, order = _plain_metrics(record)
    if instruction.model_key and instruction.model_key not in wire.records("array"):
        raise GateRefusal("manifest", f"the train reply lacks the model record {instruction.model_key!r}")
    return Reply(head_of(wire), arrays, metrics, order)


def _plain_metrics(record: WireRecord) -> tuple[dict[str, float | int], tuple[str, ...]]:
    values: dict[str, float | int] = {}
    for key, value in record.items:
        if not (type(value) is int or type(value) is float):  # exactly: no bool, list or subclass
            raise GateRefusal("metric-type", f"metric {key!r} must be one number, got {type(value).__name__}", key=key)
        values[str(key)] = value
    return values, tuple(values)


def literal_round(text: str) -> int | None:
    """The server's claimed round as an int, for the record only (None when it is not one)."""
    try:
        value: Any = ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError):
        return None
    return value if type(value) is int else None
