"""fedgate's own Flower wire codec: byte for byte Flower's serde on the way out, a strict,
zero-copy reader on the way in that never accepts what Flower would read differently, and
a schema pinned to Flower's own descriptors (an upgrade that moves a field fails here)."""

from __future__ import annotations

import hashlib
import io
import math
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata
from flwr.common.serde import recorddict_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from conftest import gate_for, instruction, through_gate
from fedgate.errors import GateRefusal
from fedgate.flower_adapter import (
    flower_message_to_bytes,
    flower_recorddict_to_bytes,
    message_from_bytes,
    message_head,
    message_to_bytes,
    recorddict_to_bytes,
)
from fedgate.gate import codec, decode
from fedgate.gate.codec import WireError, encode_message, encode_recorddict, npy_array, parse_message
from fedgate.gate.decode import decode_instruction, decode_reply
from model_fixtures import tiny_model

# -- the schema: what the codec writes and reads, against Flower's descriptors ----------------------

T = FieldDescriptor
SCHEMA: dict[str, dict[int, tuple[str, int]]] = {
    "flwr.proto.Message": {
        1: ("metadata", T.TYPE_MESSAGE), 2: ("content", T.TYPE_MESSAGE), 3: ("error", T.TYPE_MESSAGE),
    },
    "flwr.proto.Metadata": {
        1: ("run_id", T.TYPE_UINT64), 2: ("message_id", T.TYPE_STRING), 3: ("src_node_id", T.TYPE_UINT64),
        4: ("dst_node_id", T.TYPE_UINT64), 5: ("reply_to_message_id", T.TYPE_STRING), 6: ("group_id", T.TYPE_STRING),
        7: ("ttl", T.TYPE_DOUBLE), 8: ("message_type", T.TYPE_STRING), 9: ("created_at", T.TYPE_DOUBLE),
        10: ("src_task_id", T.TYPE_UINT64), 11: ("dst_task_id", T.TYPE_UINT64),
    },
    "flwr.proto.Error": {1: ("code", T.TYPE_SINT64), 2: ("reason", T.TYPE_STRING)},
    "flwr.proto.RecordDict": {1: ("items", T.TYPE_MESSAGE)},
    "flwr.proto.RecordDict.Item": {
        1: ("key", T.TYPE_STRING), 2: ("array_record", T.TYPE_MESSAGE), 3: ("metric_record", T.TYPE_MESSAGE),
        4: ("config_record", T.TYPE_MESSAGE),
    },
    "flwr.proto.ArrayRecord": {1: ("items", T.TYPE_MESSAGE)},
    "flwr.proto.ArrayRecord.Item": {1: ("key", T.TYPE_STRING), 2: ("value", T.TYPE_MESSAGE)},
    "flwr.proto.Array": {1: ("dtype", T.TYPE_STRING), 2: ("shape", T.TYPE_INT32), 3: ("stype", T.TYPE_STRING),
                         4: ("data", T.TYPE_BYTES)},
    "flwr.proto.MetricRecord": {1: ("items", T.TYPE_MESSAGE)},
    "flwr.proto.MetricRecord.Item": {1: ("key", T.TYPE_STRING), 2: ("value", T.TYPE_MESSAGE)},
    "flwr.proto.MetricRecordValue": {
        1: ("double", T.TYPE_DOUBLE), 2: ("sint64", T.TYPE_SINT64), 3: ("uint64", T.TYPE_UINT64),
        21: ("double_list", T.TYPE_MESSAGE), 22: ("sint_list", T.TYPE_MESSAGE), 23: ("uint_list", T.TYPE_MESSAGE),
    },
    "flwr.proto.ConfigRecord": {1: ("items", T.TYPE_MESSAGE)},
    "flwr.proto.ConfigRecord.Item": {1: ("key", T.TYPE_STRING), 2: ("value", T.TYPE_MESSAGE)},
    "flwr.proto.ConfigRecordValue": {
        1: ("double", T.TYPE_DOUBLE), 2: ("sint64", T.TYPE_SINT64), 3: ("uint64", T.TYPE_UINT64),
        4: ("bool", T.TYPE_BOOL), 5: ("string", T.TYPE_STRING), 6: ("bytes", T.TYPE_BYTES),
        21: ("double_list", T.TYPE_MESSAGE), 22: ("sint_list", T.TYPE_MESSAGE), 23: ("uint_list", T.TYPE_MESSAGE),
        24: ("bool_list", T.TYPE_MESSAGE), 25: ("string_list", T.TYPE_MESSAGE), 26: ("bytes_list", T.TYPE_MESSAGE),
    },
    "flwr.proto.DoubleList": {1: ("vals", T.TYPE_DOUBLE)},
    "flwr.proto.SintList": {1: ("vals", T.TYPE_SINT64)},
    "flwr.proto.UintList": {1: ("vals", T.TYPE_UINT64)},
    "flwr.proto.BoolList": {1: ("vals", T.TYPE_BOOL)},
    "flwr.proto.StringList": {1: ("vals", T.TYPE_STRING)},
    "flwr.proto.BytesList": {1: ("vals", T.TYPE_BYTES)},
}  # fmt: skip


def test_the_schema_is_flowers() -> None:
    """Every message type the codec knows, every field of it, as Flower's descriptors have it:
    a Flower upgrade that adds, renumbers or retypes a field fails here, not in production."""
    seen: dict[str, dict[int, tuple[str, int]]] = {}
    pending = [ProtoMessage.DESCRIPTOR]
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name in seen:
            continue
        seen[descriptor.full_name] = {f.number: (f.name, f.type) for f in descriptor.fields}
        pending += [f.message_type for f in descriptor.fields if f.message_type is not None]
        for field in descriptor.fields:
            if field.type != T.TYPE_MESSAGE and field.is_repeated:
                assert field.is_packed == (field.type not in (T.TYPE_STRING, T.TYPE_BYTES)), field.full_name
    assert seen == SCHEMA


# -- writing: byte for byte Flower's ----------------------------------------------------------------


def _reply(msg: Message, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> Message:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)


def test_messages_are_written_as_flower_writes_them() -> None:
    ins = instruction()
    reply = _reply(ins, tiny_model(1), {"loss": 0.25, "num-examples": 12})
    error = Message(Error(code=3, reason="no"), reply_to=ins)
    for message in (ins, reply, error):
        wire, span = encode_message(message)
        assert wire == flower_message_to_bytes(message)
        if message.has_content():
            assert wire[span] == flower_recorddict_to_bytes(message.content) == encode_recorddict(message.content)
        else:
            assert wire[span] == b""


finite = st.floats(allow_nan=True, allow_infinity=True)
ints = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(2**63, 2**64 - 1), st.sampled_from([0, -1, 1]))
keys = st.text(max_size=6)
dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint64", "bool"])


@st.composite
def ndarrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(dtypes))
    value = draw(arrays(dtype, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
    order = draw(st.sampled_from(["C", "F", "strided"]))
    if order == "F":
        value = np.asfortranarray(value)
    elif order == "strided" and value.ndim and value.shape[0] > 1:
        value = value[::2]
    return value


metric_values = st.one_of(finite, ints, st.lists(finite, max_size=4), st.lists(ints, max_size=4))
config_values = st.one_of(
    st.booleans(), ints, finite, st.text(max_size=8), st.binary(max_size=8),
    st.lists(st.booleans(), max_size=4), st.lists(ints, max_size=4), st.lists(finite, max_size=4),
    st.lists(st.text(max_size=4), max_size=4), st.lists(st.binary(max_size=4), max_size=4),
)  # fmt: skip


@st.composite
def recorddicts(draw: st.DrawFn) -> RecordDict:
    content = RecordDict()
    for name in draw(st.lists(keys, max_size=4, unique=True)):
        kind = draw(st.sampled_from(["array", "metric", "config"]))
        if kind == "array":
            items = draw(st.dictionaries(keys, ndarrays(), max_size=3))
            content[name] = ArrayRecord(OrderedDict((k, Array(v)) for k, v in items.items()))
        elif kind == "metric":
            content[name] = MetricRecord(draw(st.dictionaries(keys, metric_values, max_size=4)))
        else:
            content[name] = ConfigRecord(draw(st.dictionaries(keys, config_values, max_size=4)))
    return content


@st.composite
def messages(draw: st.DrawFn) -> Message:
    u64 = st.integers(0, 2**64 - 1)
    metadata = Metadata(
        run_id=draw(u64), message_id=draw(keys), src_node_id=draw(u64), dst_node_id=draw(u64),
        reply_to_message_id=draw(keys), group_id=draw(keys), created_at=draw(finite), ttl=draw(finite),
        message_type=draw(st.sampled_from(["train", "evaluate", "query.x", "train.step_2"])),
        src_task_id=draw(st.none() | u64), dst_task_id=draw(st.none() | u64),
    )  # fmt: skip
    if draw(st.booleans()):
        error = Error(code=draw(st.integers(-(2**63), 2**63 - 1)), reason=draw(st.none() | keys))
        return Message(metadata=metadata, error=error)  # type: ignore[call-overload, no-any-return]
    return Message(metadata=metadata, content=draw(recorddicts()))  # type: ignore[call-overload, no-any-return]


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and -0.0 apart from 0.0 (bit patterns of floats)."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages())
def test_random_messages_are_written_as_flower_writes_them_and_read_back(message: Message) -> None:
    try:
        expected = flower_message_to_bytes(message)
    except (TypeError, ValueError) as err:  # a value protobuf cannot hold: ours refuses it alike
        with pytest.raises(type(err)):
            encode_message(message)
        return
    wire, span = encode_message(message)
    assert wire == expected
    parsed = parse_message(wire)
    meta = message.metadata
    for field in ("run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id",
                  "message_type", "src_task_id", "dst_task_id", "ttl", "created_at"):  # fmt: skip
        assert _same(getattr(parsed.metadata, field), getattr(meta, field)), field
    if message.has_error():
        assert parsed.content is None and parsed.error == (message.error.code, message.error.reason or "")
        return
    assert wire[span] == recorddict_to_bytes(message.content)
    assert parsed.content is not None and [n for n, _ in parsed.content] == list(message.content)
    for name, record in parsed.content:
        original = message.content[name]
        assert list(record.as_dict()) == list(original)
        for key, value in record.items:
            if record.kind == "array":
                flower = original[key]
                assert isinstance(flower, Array)
                assert (value.dtype, value.shape, value.stype, bytes(value.data)) == (
                    flower.dtype, tuple(flower.shape), flower.stype, flower.data)  # fmt: skip
            else:
                assert _same(value, original[key]), (name, key)
    assert flower_recorddict_to_bytes(codec.to_recorddict(parsed.content)) == wire[span]


@settings(max_examples=200, deadline=None)
@given(value=ndarrays())
def test_npy_array_is_flowers_array(value: np.ndarray) -> None:
    ours, flowers = npy_array(value), Array(value)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )
    assert np.array_equal(ours.numpy(), value, equal_nan=value.dtype.kind == "f")


def test_values_flower_refuses_are_refused() -> None:
    for bad in (MetricRecord({"x": 1.0}), ConfigRecord({"x": "y"})):
        bad.__dict__["_data"] = {"x": object()}  # past the record's own type check
        with pytest.raises(TypeError):
            encode_recorddict(RecordDict({"r": bad}))
    huge = ConfigRecord({"x": 1})
    huge.__dict__["_data"] = {"x": 2**64}
    with pytest.raises(ValueError):
        encode_recorddict(RecordDict({"r": huge}))


# -- reading: views, strictness, and never more permissive than Flower ------------------------------


def test_arrays_are_read_as_views_of_the_input() -> None:
    raw = flower_message_to_bytes(_reply(instruction(), tiny_model(2), {}))
    parsed = parse_message(raw)
    array = parsed.records("array")["arrays"].as_dict()["conv.weight"]
    base = np.frombuffer(raw, dtype=np.uint8)
    view = np.frombuffer(array.data, dtype=np.uint8)
    assert np.shares_memory(base, view) and array.data.readonly
    assert bytes(array.data) == Array(tiny_model(2)["conv.weight"]).data


def test_message_head_keeps_the_metadata_and_leaves_the_content_out() -> None:
    ins = instruction()
    head = message_head(flower_message_to_bytes(ins))
    assert head.metadata.message_id == ins.metadata.message_id and head.metadata.run_id == ins.metadata.run_id
    assert head.has_content() and len(head.content) == 0
    error = message_head(flower_message_to_bytes(Message(Error(code=7, reason="r"), reply_to=ins)))
    assert error.has_error() and error.error.code == 7 and error.error.reason == "r"


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = codec._varint(number << 3 | wire)
    if wire == 2:
        return key + codec._varint(len(payload)) + payload
    return key + payload


def _message(metadata: bytes = b"", content: bytes | None = b"", extra: bytes = b"") -> bytes:
    body = _field(1, 2, metadata)
    if content is not None:
        body += _field(2, 2, content)
    return body + extra


def _record(name: bytes, kind: int, *items: bytes) -> bytes:
    """A RecordDict item: record `name` of kind 2 (arrays), 3 (metrics) or 4 (configs)."""
    return _field(1, 2, _field(1, 2, name) + _field(kind, 2, b"".join(items)))


def _item(key: bytes, value: bytes | None) -> bytes:
    return _field(1, 2, _field(1, 2, key) + (b"" if value is None else _field(2, 2, value)))


DOUBLE_ZERO = _field(1, 1, b"\x00" * 8)
MALFORMED = {
    "unknown field in Message": _message(extra=_field(9, 2, b"")),
    "unknown field in Metadata": _message(metadata=_field(12, 0, b"\x01")),
    "duplicate metadata": _message(extra=_field(1, 2, b"")),
    "duplicate scalar in Metadata": _message(metadata=_field(1, 0, b"\x01") + _field(1, 0, b"\x02")),
    "wrong wire type": _message(metadata=_field(1, 2, b"\x01")),
    "both content and error": _message(extra=_field(3, 2, b"")),
    "neither content nor error": _message(content=None),
    "no metadata": _field(2, 2, b""),
    "non-minimal varint": _message(metadata=_field(1, 0, b"\x81\x00")),
    "varint of 11 bytes": _message(metadata=_field(1, 0, b"\xff" * 10 + b"\x01")),
    "varint past 2^64": _message(metadata=_field(1, 0, b"\xff" * 9 + b"\x02")),
    "length past the end": _field(1, 2, b"")[:-1] + b"\x05",
    "truncated fixed64": _message(metadata=_field(7, 1, b"\x00" * 4)),
    "invalid UTF-8": _message(metadata=_field(2, 2, b"\xff\xfe")),
    "field number 0": _message(extra=b"\x02\x00"),
    "record with no record": _message(content=_field(1, 2, _field(1, 2, b"r"))),
    "record with two records": _message(content=_field(1, 2, _field(1, 2, b"r") + _field(3, 2, b"") * 2)),
    "duplicate record name": _message(content=_record(b"r", 3) * 2),
    "duplicate metric key": _message(content=_record(b"m", 3, _item(b"k", DOUBLE_ZERO), _item(b"k", DOUBLE_ZERO))),
    "metric value with two values": _message(content=_record(b"m", 3, _item(b"k", DOUBLE_ZERO + DOUBLE_ZERO))),
    "metric value of a config type": _message(content=_record(b"m", 3, _item(b"k", _field(5, 2, b"s")))),
    "metric value holding nothing": _message(content=_record(b"m", 3, _item(b"k", b""))),
    "a bool of 2": _message(content=_record(b"c", 4, _item(b"k", _field(4, 0, b"\x02")))),
    "a double list of 7 bytes": _message(content=_record(b"m", 3, _item(b"k", _field(21, 2, _field(1, 2, bytes(7)))))),
    "an unpacked int list": _message(content=_record(b"m", 3, _item(b"k", _field(22, 2, _field(1, 0, b"\x02"))))),
    "a shape beyond int32": _message(content=_record(b"a", 2, _item(b"w", _field(2, 2, codec._varint(2**31))))),
    "an array item with no value": _message(content=_record(b"a", 2, _item(b"w", None))),
    "an unknown field in an Array": _message(content=_record(b"a", 2, _item(b"w", _field(5, 2, b"")))),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_messages_are_refused(case: str) -> None:
    with pytest.raises(WireError):
        parse_message(MALFORMED[case])


def test_a_malformed_reply_is_a_refusal_at_the_gate() -> None:
    ins = decode_instruction(flower_message_to_bytes(instruction()), ("train",))
    good = flower_message_to_bytes(_reply(ins.message, tiny_model(), {}))
    duplicated = good + _field(2, 2, b"")  # protobuf would merge a second content into the first
    with pytest.raises(GateRefusal) as refused:
        decode_reply(duplicated, ins)
    assert refused.value.rule == "reply-unreadable"
    assert decode_reply(good, ins).arrays["conv.weight"].shape == (4, 1, 3, 3)


def _flower_proto(raw: bytes) -> ProtoMessage | None:
    try:
        return ProtoMessage.FromString(raw)
    except Exception:
        return None


def _mutants(raw: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = [raw[:cut] for cut in range(0, len(raw), max(1, len(raw) // 200))]
    for _ in range(count):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.5:
                data[position] = rng.randrange(256)
            elif choice < 0.75:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            else:
                del data[position : position + rng.randint(1, 3)]
        out.append(bytes(data))
    return out


def test_fuzzed_bytes_are_read_as_flower_reads_them_or_refused() -> None:
    """Truncations and random mutations of real messages: the reader either refuses with
    WireError (nothing else escapes) or reads exactly what Flower's protobuf reads."""
    rng = random.Random(15)
    ins = instruction()
    sources = [
        flower_message_to_bytes(ins),
        flower_message_to_bytes(_reply(ins, tiny_model(3), {"loss": 0.5, "n": 3})),
        flower_message_to_bytes(Message(Error(code=1, reason="x"), reply_to=ins)),
    ]
    accepted = 0
    for raw in sources:
        for mutant in _mutants(raw, rng, 700):
            try:
                parsed = parse_message(mutant)
            except WireError:
                continue
            accepted += 1
            proto = _flower_proto(mutant)  # what Flower's protobuf reads (before its own checks)
            assert proto is not None, mutant
            meta = proto.metadata
            assert (parsed.metadata.message_id, parsed.metadata.run_id, parsed.metadata.message_type,
                    parsed.metadata.src_task_id) == (meta.message_id, meta.run_id, meta.message_type,
                    meta.src_task_id if meta.HasField("src_task_id") else None)  # fmt: skip
            if parsed.content is None:
                assert proto.HasField("error") and not proto.HasField("content")
                assert parsed.error == (proto.error.code, proto.error.reason)
                continue
            assert proto.HasField("content") and not proto.HasField("error")
            try:
                flower = recorddict_from_proto(proto.content)
            except Exception:  # Flower's objects refuse it (the gate's checks refuse it too)
                continue
            assert recorddict_to_bytes(codec.to_recorddict(parsed.content)) == recorddict_to_bytes(flower)
    assert accepted > 0  # some mutations (inside array data, say) stay valid


def test_doubles_keep_their_bits() -> None:
    record = MetricRecord({"a": -0.0, "b": math.inf, "c": [math.nan, -0.0]})
    ins = instruction()
    message = Message(RecordDict({"metrics": record}), reply_to=ins)
    wire, _ = encode_message(message)
    assert wire == flower_message_to_bytes(message)
    values = parse_message(wire).records("metric")["metrics"].as_dict()
    assert _same(values["a"], -0.0) and values["b"] == math.inf and _same(values["c"], [math.nan, -0.0])


@settings(max_examples=200, deadline=None)
@given(value=ndarrays())
def test_the_npy_header_fast_path_reads_what_numpy_reads(value: np.ndarray) -> None:
    """`decode_array` reads numpy's own canonical header without numpy's general parser: it
    must agree with numpy wherever it answers (and it answers for every gate dtype)."""
    data = Array(value).data
    fast = decode._canonical_header(data)
    header = io.BytesIO(data)
    assert np.lib.format.read_magic(header) == (1, 0)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    assert fast == (tuple(shape), fortran, dtype, header.tell())


@pytest.mark.parametrize(
    "header",
    [
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (05,), }",  # numpy refuses leading zeros
        b"{'descr': '<f3', 'fortran_order': False, 'shape': (5,), }",
        b"{'descr': '<f4', 'fortran_order': 0, 'shape': (5,), }",
        b"{'descr': '<f4', 'shape': (5,), 'fortran_order': False, }",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (5,), 'x': 1, }",
        b"{'descr': '<f4', 'fortran_order': False, 'shape': (-5,), }",
    ],
)
def test_headers_off_the_canonical_form_go_to_numpys_reader(header: bytes) -> None:
    padded = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded + bytes(20)
    assert decode._canonical_header(data) is None


def test_negative_dimensions_are_refused_even_when_their_product_fits() -> None:
    """numpy's header reader accepts (-2, -3): six values, a positive count; the gate refuses."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2, -3), }"
    padded = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded + bytes(24)
    array = codec.WireArray("float32", (-2, -3), "numpy.ndarray", memoryview(data))
    with pytest.raises(GateRefusal, match="shape"):
        decode.decode_array("w", array)


def test_the_gate_ships_exactly_the_bytes_its_ledger_recorded(tmp_path: Path) -> None:
    """What leaves (`Outcome.wire`) is Flower's serialisation of `Outcome.message`, and its
    content is byte for byte the payload the ledger hashed and stored before release."""
    gate = gate_for(tmp_path)
    out = through_gate(gate, instruction(), lambda msg: _reply(msg, tiny_model(4), {"num-examples": 3}))
    assert out.decision.sent and out.message is not None and out.wire is not None
    assert out.wire == flower_message_to_bytes(out.message)
    recorded = gate.ledger.entries()[out.seq]["payloads"]["sent"]
    stored = gate.ledger.blobs.get(recorded["sha256"])
    content = recorddict_to_bytes(out.message.content)
    assert stored == content and recorded["size"] == len(content) and content in bytes(out.wire)
    head = parse_message(out.wire)
    assert head.metadata.reply_to_message_id == out.message.metadata.reply_to_message_id
    gate.close()


def test_the_fast_path_writes_every_byte_it_ships(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15's fast path: the noise writes the model straight into the buffer that leaves,
    which is not zeroed (the gate process's old memory). Filled with 0xFF first (a NaN in
    every float, -1 in every integer), no byte of it may reach the wire: the shipped bytes are
    Flower's serialisation of the message they carry, every float is finite, the integer and
    empty tensors are the server's, and the ledger holds the same content."""
    filled: list[int] = []

    def marked(size: int) -> np.ndarray:
        filled.append(size)
        return np.full(size, 0xFF, dtype=np.uint8)

    monkeypatch.setattr(codec, "_allocate", marked)
    tensors = {**tiny_model(5), "half": np.ones((3, 5), np.float16), "double": np.arange(7.0),
               "empty": np.zeros((0, 4), np.float32), "count": np.array([7, 9], np.int32)}  # fmt: skip
    trained = {k: (v + 0.5).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    gate = gate_for(tmp_path)
    out = through_gate(gate, instruction(tensors=tensors), lambda msg: _reply(msg, trained, {"num-examples": 3}))
    assert out.decision.sent and isinstance(out.wire, memoryview) and filled  # the fast path was taken
    assert out.message is not None
    assert bytes(out.wire) == flower_message_to_bytes(out.message)
    sent = out.message.content["arrays"]
    assert list(sent) == list(tensors)
    for name, value in tensors.items():
        got = sent[name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        if value.dtype.kind == "f":
            assert np.isfinite(got).all(), name
        else:
            assert np.array_equal(got, value), name
    recorded = gate.ledger.entries()[out.seq]["payloads"]["sent"]
    assert gate.ledger.blobs.get(recorded["sha256"]) == recorddict_to_bytes(out.message.content)
    gate.close()


def test_laid_out_bytes_are_encode_messages(tmp_path: Path) -> None:
    """The buffer the noise writes into holds, around the arrays, exactly the bytes
    `encode_message` writes for the same message (itself Flower's, tests above); it is
    finished once: a second use takes the slow path."""
    from fedgate.gate.outgoing import CheckedContent, wire_of

    ins = instruction(tensors={**tiny_model(2), "half": np.ones(3, np.float16), "empty": np.zeros(0, np.float64)})
    decoded = decode_instruction(message_to_bytes(ins), ("train", "evaluate", "query"))
    laid = codec.LaidOutReply("arrays", [(n, v.dtype, v.shape) for n, v in decoded.model.items()], 4096)
    for target, value in zip(laid.arrays, decoded.model.values(), strict=True):
        target[...] = value
    model = OrderedDict(zip(decoded.model, laid.arrays, strict=True))
    checked = CheckedContent("arrays", model, {"num-examples": 3, "train-loss": 0.5}, laid)
    metadata = Message(RecordDict(), reply_to=ins).metadata
    made = wire_of(checked, Message(metadata=metadata, content=RecordDict()))
    assert made is not None
    wire, span = made
    expected, expected_span = encode_message(Message(metadata=metadata, content=checked.record_dict()))
    assert bytes(wire) == expected and span == expected_span
    assert wire.readonly and all(not a.flags.writeable for a in laid.arrays)
    assert wire_of(checked, Message(metadata=metadata, content=RecordDict())) is None


@pytest.mark.parametrize(
    ("ttl", "created_at"), [(3600.0, None), (float("nan"), 5.0), (float("inf"), 1e300), (1e-300, 0.0)]
)
def test_a_servers_extreme_metadata_and_names_still_leave_as_flower_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ttl: float, created_at: float | None
) -> None:
    """The fast path leaves room for the reply's metadata before the content: a hostile server
    makes it as large and odd as it can (1 MB message type and group id, the largest run id,
    non-finite ttl, names with NUL and line separators, a 3,000-character record key). The
    bytes that leave are still Flower's encoding of the message they carry, the laid-out
    buffer's marker never leaves, and the ledger holds the content (red team, issue 15)."""
    from flwr.app import Array as FlowerArray

    from fedgate.flower_adapter import make_instruction

    monkeypatch.setattr(codec, "_allocate", lambda size: np.full(size, 0xAB, dtype=np.uint8))
    model = {"": np.ones(3, np.float32), "é\u2028\x00": np.arange(4, dtype=np.int8), "w" * 5000: np.ones((2, 0, 3))}
    key = "x" * 3000

    def record() -> ArrayRecord:
        return ArrayRecord({n: FlowerArray(v) for n, v in model.items()})

    ins = make_instruction(RecordDict({"config": ConfigRecord({"server-round": 1}), key: record()}),
                           "train." + "y" * (1 << 20), dst_node_id=17, run_id=(1 << 64) - 1, group_id="g" * (1 << 20),
                           ttl=ttl, created_at=created_at)  # fmt: skip
    gate = gate_for(tmp_path, max_total_bits=0.0)
    out = through_gate(gate, ins, lambda m: Message(RecordDict({key: record(), "metrics": MetricRecord(
        {"num-examples": 3})}), reply_to=m))  # fmt: skip
    assert out.decision.sent and isinstance(out.wire, memoryview), out.decision.reason
    shipped = bytes(out.wire)
    assert shipped == flower_message_to_bytes(message_from_bytes(out.wire)) and b"\xab" * 8 not in shipped
    recorded = gate.ledger.entries()[out.seq]["payloads"]["sent"]
    assert gate.ledger.blobs.get(recorded["sha256"]) in shipped
    gate.close()


def test_a_large_instructions_hash_is_recorded_exactly(tmp_path: Path) -> None:
    """From 1 MiB on, the instruction's SHA-256 is computed on a thread while the ClientApp runs
    (issue 15): the ledger still records the hash of exactly the bytes that came in."""
    from fedgate.gate.pipeline import InstructionDigest

    ins = instruction(tensors={"w": np.arange(400_000, dtype=np.float32)})
    raw = message_to_bytes(ins)
    assert len(raw) >= InstructionDigest.THREAD_FROM
    gate = gate_for(tmp_path)
    out = through_gate(gate, ins, lambda msg: _reply(msg, {"w": np.arange(400_000, dtype=np.float32)}, {}))
    assert out.decision.sent
    assert gate.ledger.entries()[out.seq]["instruction"]["sha256"] == hashlib.sha256(raw).hexdigest()
    gate.close()
