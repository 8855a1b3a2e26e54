"""Flower's wire format, written and read by fedgate itself: the protobuf bytes of a Message
and of a RecordDict, byte for byte what Flower 1.42's serde writes, and a strict reader that
hands back the arrays' bytes as views of the input instead of copies.

Why not Flower's serde: it copies every array two or three times on the way out (numpy ->
`np.save` -> protobuf object -> bytes: ~20x one SHA-256 pass over a 45 MB model here) and
once per array on the way in. Here an outgoing message is one `b"".join` of small headers
and the arrays' own buffers, and an incoming one is parsed without touching the array data.

The reader is stricter than protobuf: every field must be one this schema (flwr.proto,
pinned by tests/gate/test_codec.py against Flower's descriptors) declares, with its wire
type, singular fields and packed lists at most once, strings valid UTF-8, varints minimal in
range, records and keys unique, exactly one of content and error. Flower writes nothing
else, so a refusal here is never a message Flower itself sent; anything malformed raises
`WireError`, never reads outside the buffer, and never builds an object the ClientApp chose."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedgate.errors import FedgateError

NUMPY_STYPE = "numpy.ndarray"
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_VARINT, _FIXED64, _LENGTH = 0, 1, 2
Buffer = bytes | memoryview


class WireError(FedgateError, ValueError):
    """Bytes that are not a message this Flower version writes (truncated, unknown field,
    duplicate, out of range). A ValueError too, as protobuf's own parse errors are."""


# -- writing -------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0 or value > _UINT64_MAX:
        raise ValueError(f"value {value} out of range for a 64-bit varint")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _zigzag(value: int) -> int:
    if not -(1 << 63) <= value <= _INT64_MAX:
        raise ValueError(f"value {value} out of range for sint64")
    return (value << 1) ^ (value >> 63)


class _Body:
    """A message being written: small headers and big buffers, joined once at the end. A part
    that is an int is a hole of that many bytes, filled later (`LaidOutReply`), never joined."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[Buffer | int] = []
        self.size = 0

    def raw(self, data: Buffer) -> None:
        self.parts.append(data)
        self.size += len(data)

    def hole(self, size: int) -> None:
        self.parts.append(size)
        self.size += size

    def joined(self) -> bytes:
        if any(isinstance(part, int) for part in self.parts):
            raise ValueError("a message with holes is written by LaidOutReply, not joined")
        return b"".join(self.parts)  # type: ignore[arg-type]  # no ints: checked above

    def varint(self, field: int, value: int) -> None:
        self.raw(_tag(field, _VARINT) + _varint(value))

    def double(self, field: int, value: float) -> None:
        self.raw(_tag(field, _FIXED64) + struct.pack("<d", value))

    def blob(self, field: int, data: Buffer) -> None:
        self.raw(_tag(field, _LENGTH) + _varint(len(data)))
        if len(data):
            self.raw(data)

    def text(self, field: int, value: str) -> None:
        self.blob(field, value.encode("utf-8"))

    def message(self, field: int, body: _Body) -> None:
        self.raw(_tag(field, _LENGTH) + _varint(body.size))
        self.parts.extend(body.parts)
        self.size += body.size

    # proto3 fields without presence are left out at their default
    def implicit_varint(self, field: int, value: int) -> None:
        if value:
            self.varint(field, value)

    def implicit_double(self, field: int, value: float) -> None:
        if struct.pack("<d", value) != bytes(8):  # -0.0 is written, as upb does
            self.double(field, value)

    def implicit_text(self, field: int, value: str) -> None:
        if value:
            self.text(field, value)


def _array_body(array: Array) -> _Body:
    body = _Body()
    body.implicit_text(1, array.dtype)
    if array.shape:
        packed = b"".join(_varint(_int32(d) & _UINT64_MAX) for d in array.shape)
        body.blob(2, packed)
    body.implicit_text(3, array.stype)
    if not isinstance(array.data, bytes):
        raise TypeError(f"Array.data must be bytes, not {type(array.data).__name__}")
    if array.data:
        body.blob(4, array.data)
    return body


def _int32(value: int) -> int:
    if not -(1 << 31) <= value < (1 << 31):
        raise ValueError(f"value {value} out of range for int32")
    return value


_SCALAR_FIELDS = {float: 1, int: 2, bool: 4, str: 5, bytes: 6}
_LIST_FIELDS = {float: 21, int: 22, bool: 24, str: 25, bytes: 26}
_UINT_FIELD, _UINT_LIST_FIELD = 3, 23


def _value_body(value: Any, allowed: tuple[type, ...]) -> _Body:
    """One MetricRecordValue / ConfigRecordValue, chosen exactly as Flower's
    `_record_value_to_proto` chooses (bool before int; uint64 above INT64_MAX)."""
    body = _Body()
    for kind in allowed:
        if isinstance(value, kind):
            _scalar(body, kind, value)
            return body
        if isinstance(value, list) and all(isinstance(item, kind) for item in value):
            _list(body, kind, value)
            return body
    raise TypeError(f"a record value of type {type(value).__name__} is not allowed: {value!r}"[:300])


def _scalar(body: _Body, kind: type, value: Any) -> None:
    if kind is float:
        body.double(1, value)
    elif kind is int and value > _INT64_MAX:
        body.varint(_UINT_FIELD, value)
    elif kind is int:
        body.varint(2, _zigzag(value))
    elif kind is bool:
        body.varint(4, int(value))
    elif kind is str:
        body.text(5, value)
    else:
        body.blob(6, value)


def _list(body: _Body, kind: type, values: list[Any]) -> None:
    inner = _Body()
    if kind is float:
        if values:
            inner.blob(1, struct.pack(f"<{len(values)}d", *values))
        field = 21
    elif kind is int and any(v > _INT64_MAX for v in values):
        if values:
            inner.blob(1, b"".join(_varint(v) for v in values))
        field = _UINT_LIST_FIELD
    elif kind is int:
        if values:
            inner.blob(1, b"".join(_varint(_zigzag(v)) for v in values))
        field = 22
    elif kind is bool:
        if values:
            inner.blob(1, bytes(int(v) for v in values))
        field = 24
    elif kind is str:
        for text in values:
            inner.text(1, text)
        field = 25
    else:
        for data in values:
            inner.blob(1, data)
        field = 26
    body.message(field, inner)


_METRIC_TYPES: tuple[type, ...] = (float, int)
_CONFIG_TYPES: tuple[type, ...] = (bool, int, float, str, bytes)


def _items_body(items: Iterable[tuple[str, _Body]]) -> _Body:
    body = _Body()
    for key, value in items:
        item = _Body()
        item.implicit_text(1, key)
        item.message(2, value)
        body.message(1, item)
    return body


def _recorddict_body(content: RecordDict) -> _Body:
    body = _Body()
    for name, record in content.items():
        item = _Body()
        item.implicit_text(1, name)
        if isinstance(record, ArrayRecord):
            item.message(2, _items_body((k, _array_body(v)) for k, v in record.items()))
        elif isinstance(record, MetricRecord):
            item.message(3, _items_body((k, _value_body(v, _METRIC_TYPES)) for k, v in record.items()))
        elif isinstance(record, ConfigRecord):
            item.message(4, _items_body((k, _value_body(v, _CONFIG_TYPES)) for k, v in record.items()))
        else:
            raise ValueError(f"Unsupported record type: {type(record)}")
        body.message(1, item)
    return body


def _metadata_body(message: Message) -> _Body:
    return _metadata_fields(message.metadata)


def _metadata_fields(meta: Metadata) -> _Body:
    body = _Body()
    body.implicit_varint(1, meta.run_id)
    body.implicit_text(2, meta.message_id)
    body.implicit_varint(3, meta.src_node_id)
    body.implicit_varint(4, meta.dst_node_id)
    body.implicit_text(5, meta.reply_to_message_id)
    body.implicit_text(6, meta.group_id)
    body.implicit_double(7, meta.ttl)
    body.implicit_text(8, meta.message_type)
    body.implicit_double(9, meta.created_at)
    if meta.src_task_id is not None:
        body.varint(10, meta.src_task_id)
    if meta.dst_task_id is not None:
        body.varint(11, meta.dst_task_id)
    return body


def encode_recorddict(content: RecordDict) -> bytes:
    """The bytes of `recorddict_to_proto(content).SerializeToString()`, without its copies."""
    return _recorddict_body(content).joined()


def encode_message(message: Message) -> tuple[bytes, slice]:
    """The bytes of `message_to_proto(message).SerializeToString()`, and where in them the
    content's own bytes (`encode_recorddict(message.content)`) lie: what the ledger records
    is a view of exactly what leaves. An empty slice when the message carries an error."""
    body = _Body()
    body.message(1, _metadata_body(message))
    span = slice(0, 0)
    if message.has_content():
        content = _recorddict_body(message.content)
        header = _tag(2, _LENGTH) + _varint(content.size)
        start = body.size + len(header)
        span = slice(start, start + content.size)
        body.message(2, content)
    if message.has_error():
        error = _Body()
        error.implicit_varint(1, _zigzag(int(message.error.code)))
        error.implicit_text(2, message.error.reason or "")
        body.message(3, error)
    return body.joined(), span


def npy_array(value: np.ndarray) -> Array:
    """`Array(value)` as Flower makes it (dtype, shape, stype, `np.save`'s bytes), with one
    copy of the data instead of three."""
    header = io.BytesIO()
    if value.dtype.hasobject or not (value.flags.c_contiguous or value.flags.f_contiguous):
        return Array(value)  # Flower's own path: it refuses objects; strided arrays are rare
    try:
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(value))
    except ValueError:  # a header too long for version 1.0: np.save picks another version
        return Array(value)
    fortran = value.flags.f_contiguous and not value.flags.c_contiguous
    try:
        raw: Buffer = (value.T if fortran else value).data.cast("B") if value.size else b""
    except (TypeError, ValueError):  # dtypes without a buffer format (datetime, ...)
        return Array(value)
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY_STYPE,
                 data=b"".join((header.getvalue(), raw)))  # fmt: skip


def _allocate(size: int) -> np.ndarray:
    """The buffer of a `LaidOutReply` (uninitialised; a test swaps this to fill it first)."""
    return np.empty(size, dtype=np.uint8)


class LaidOutReply:
    """A reply's bytes laid out in one buffer before its arrays' values exist (issue 15).

    `arrays` are writable views of where each array's data lies inside the would-be
    `encode_message` bytes; the gate writes the noised model straight into them, then adds the
    records that follow (`finish`) and the message around (`wire`). What leaves is then the
    buffer itself: no copy between the noise and the wire (two 45 MB copies before). The
    bytes are those `encode_message` writes for the same message (tests/gate/test_codec.py).

    The buffer comes from numpy's allocator (`_allocate`), which reuses the memory of earlier
    replies: a fresh anonymous mapping cost ~40 ms of page faults per 45 MB reply here, numpy's
    ~8 ms. It is not zeroed: every byte of what leaves is written here or by the noise (the
    tests fill the buffer with a marker first and compare with `encode_message`)."""

    def __init__(
        self, record_key: str, specs: Sequence[tuple[str, np.dtype[Any], tuple[int, ...]]], headroom: int,
        tail_room: int = 1 << 16,
    ) -> None:  # fmt: skip
        """`specs`: (name, dtype, shape) of the array record `record_key`, in order;
        `headroom`: room before the content for the message's metadata and tags;
        `tail_room`: room after the arrays for the records `finish` adds."""
        arrays = _Body()
        for name, dtype, shape in specs:
            if dtype.hasobject:
                raise ValueError(f"{name}: object arrays are not laid out")
            header = io.BytesIO()  # as `npy_array` writes it for a C-contiguous array
            header_fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(header, header_fields)  # ValueError: too long for 1.0
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            body = _Body()
            body.implicit_text(1, str(dtype))
            if shape:
                body.blob(2, b"".join(_varint(_int32(d) & _UINT64_MAX) for d in shape))
            body.implicit_text(3, NUMPY_STYPE)
            body.raw(_tag(4, _LENGTH) + _varint(len(header.getvalue()) + nbytes))
            body.raw(header.getvalue())
            body.hole(nbytes)
            item = _Body()
            item.implicit_text(1, name)
            item.message(2, body)
            arrays.message(1, item)
        record = _Body()
        record.implicit_text(1, record_key)
        record.message(2, arrays)
        content = _Body()
        content.message(1, record)
        self.start = headroom
        self.size = content.size  # grows in `finish`
        self._finished = False
        self.buffer = _allocate(headroom + content.size + tail_room)
        self._bytes = self.buffer.data.cast("B")
        holes: list[int] = []
        position = headroom
        for part in content.parts:
            if isinstance(part, int):
                holes.append(position)
                position += part
            else:
                self._bytes[position : position + len(part)] = part
                position += len(part)
        self.arrays = tuple(
            np.frombuffer(self.buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=at).reshape(shape)
            for (_, dtype, shape), at in zip(specs, holes, strict=True)
        )

    def finish(self, records: RecordDict) -> None:
        """Write `records` (e.g. the metrics) after the array record; raises ValueError when
        they do not fit the tail room (the caller then encodes the slow way)."""
        if self._finished:
            raise ValueError("already finished")
        tail = _recorddict_body(records).joined()
        end = self.start + self.size
        if end + len(tail) > len(self._bytes):
            raise ValueError(f"{len(tail)} bytes of records do not fit the {len(self._bytes) - end} left")
        self._bytes[end : end + len(tail)] = tail
        self.size += len(tail)
        self._finished = True
        for array in self.arrays:
            array.flags.writeable = False

    def wire(self, metadata: Metadata) -> tuple[memoryview, slice]:
        """The message's bytes (`encode_message` of Message(metadata, the content)) as a view
        of the buffer, and where the content lies in them; ValueError if the metadata does
        not fit the headroom."""
        if not self._finished:
            raise ValueError("finish the records first")
        head = _Body()
        head.message(1, _metadata_fields(metadata))
        head.raw(_tag(2, _LENGTH) + _varint(self.size))
        prefix = head.joined()
        if len(prefix) > self.start:
            raise ValueError(f"{len(prefix)} bytes of metadata do not fit the {self.start} of headroom")
        begin = self.start - len(prefix)
        self._bytes[begin : self.start] = prefix
        view = self._bytes[begin : self.start + self.size].toreadonly()
        return view, slice(len(prefix), len(prefix) + self.size)


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WireArray:
    """An Array as it lies in the message: `data` is a read-only view of the input bytes."""

    dtype: str
    shape: tuple[int, ...]
    stype: str
    data: memoryview


@dataclass(frozen=True)
class WireRecord:
    """One record of a RecordDict: kind "array" (values WireArray), "metric" or "config"
    (values int, float, bool, str, bytes or lists of them, as Flower decodes them)."""

    kind: str
    items: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)


@dataclass(frozen=True)
class WireMetadata:
    run_id: int = 0
    message_id: str = ""
    src_node_id: int = 0
    dst_node_id: int = 0
    reply_to_message_id: str = ""
    group_id: str = ""
    ttl: float = 0.0
    message_type: str = ""
    created_at: float = 0.0
    src_task_id: int | None = None
    dst_task_id: int | None = None


@dataclass(frozen=True)
class WireMessage:
    """A parsed Message: exactly one of `content` (records in wire order) and `error`
    ((code, reason)) is set."""

    metadata: WireMetadata
    content: tuple[tuple[str, WireRecord], ...] | None
    error: tuple[int, str] | None

    def records(self, kind: str) -> dict[str, WireRecord]:
        return {name: record for name, record in self.content or () if record.kind == kind}


class _Reader:
    """Fields of one message in `view[start:end]`."""

    __slots__ = ("end", "pos", "seen", "view")

    def __init__(self, view: memoryview, start: int, end: int) -> None:
        self.view, self.pos, self.end = view, start, end
        self.seen: set[int] = set()

    def __iter__(self) -> _Reader:
        return self

    def __next__(self) -> tuple[int, int]:
        if self.pos >= self.end:
            raise StopIteration
        key = self.varint()
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        return field, wire

    def varint(self) -> int:
        view, pos, end = self.view, self.pos, self.end
        result = shift = 0
        while True:
            if pos >= end:
                raise WireError("truncated varint")
            byte = view[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 70:
                raise WireError("varint longer than 10 bytes")
        if result > _UINT64_MAX or (byte == 0 and shift):
            raise WireError("varint out of range or not minimal")
        self.pos = pos
        return result

    def fixed64(self) -> bytes:
        if self.end - self.pos < 8:
            raise WireError("truncated fixed64")
        data = bytes(self.view[self.pos : self.pos + 8])
        self.pos += 8
        return data

    def span(self) -> tuple[int, int]:
        length = self.varint()
        if length > self.end - self.pos:
            raise WireError("length past the end of its message")
        start = self.pos
        self.pos += length
        return start, self.pos

    def once(self, field: int) -> None:
        if field in self.seen:
            raise WireError(f"field {field} appears twice")
        self.seen.add(field)

    def expect(self, field: int, wire: int, expected: int) -> None:
        if wire != expected:
            raise WireError(f"field {field} has wire type {wire}, expected {expected}")
        self.once(field)

    def text(self) -> str:
        start, end = self.span()
        try:
            return str(self.view[start:end].tobytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise WireError(f"a string is not UTF-8: {err}") from err

    def sub(self) -> _Reader:
        start, end = self.span()
        return _Reader(self.view, start, end)


def _unknown(field: int, where: str) -> WireError:
    return WireError(f"unknown field {field} in {where}")


def _int64(value: int) -> int:
    return value - (1 << 64) if value > _INT64_MAX else value


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _read_int32(value: int) -> int:
    signed = _int64(value)
    if not -(1 << 31) <= signed < (1 << 31):
        raise WireError(f"int32 value {signed} out of range")
    return signed


def _packed(reader: _Reader) -> list[int]:
    inner = reader.sub()
    values = []
    while inner.pos < inner.end:
        values.append(inner.varint())
    return values


def _read_array(reader: _Reader) -> WireArray:
    dtype, stype, data = "", "", memoryview(b"")
    shape: tuple[int, ...] = ()
    for field, wire in reader:
        if field == 1:
            reader.expect(field, wire, _LENGTH)
            dtype = reader.text()
        elif field == 2:
            reader.expect(field, wire, _LENGTH)
            shape = tuple(_read_int32(v) for v in _packed(reader))
        elif field == 3:
            reader.expect(field, wire, _LENGTH)
            stype = reader.text()
        elif field == 4:
            reader.expect(field, wire, _LENGTH)
            start, end = reader.span()
            data = reader.view[start:end]
        else:
            raise _unknown(field, "Array")
    return WireArray(dtype, shape, stype, data)


def _read_list(reader: _Reader, field: int) -> list[Any]:
    inner = reader.sub()
    values: list[Any] = []
    for number, wire in inner:
        if number != 1:
            raise _unknown(number, "a list value")
        if field in (25, 26):  # strings and bytes: one field per element
            if wire != _LENGTH:
                raise WireError("a list element has the wrong wire type")
            values.append(inner.text() if field == 25 else _bytes(inner))
            continue
        inner.expect(number, wire, _LENGTH)
        start, end = inner.span()
        if field == 21:
            if (end - start) % 8:
                raise WireError("a packed double list is not a whole number of doubles")
            values = list(struct.unpack(f"<{(end - start) // 8}d", inner.view[start:end]))
        else:
            packed = _Reader(inner.view, start, end)
            while packed.pos < packed.end:
                raw = packed.varint()
                values.append(_decode_int(field, raw))
    return values


def _bytes(reader: _Reader) -> bytes:
    start, end = reader.span()
    return reader.view[start:end].tobytes()


def _decode_int(field: int, raw: int) -> int | bool:
    if field in (2, 22):
        return _unzigzag(raw)
    if field in (4, 24):
        if raw > 1:
            raise WireError("a bool is neither 0 nor 1")
        return bool(raw)
    return raw  # uint64


def _read_value(reader: _Reader, allowed: frozenset[int]) -> Any:
    value: Any = None
    for field, wire in reader:
        if value is not None or field not in allowed:
            raise WireError(f"a record value has field {field} (more than one, or not allowed here)")
        if field == 1:
            reader.expect(field, wire, _FIXED64)
            value = struct.unpack("<d", reader.fixed64())[0]
        elif field in (2, 3, 4):
            reader.expect(field, wire, _VARINT)
            value = _decode_int(field, reader.varint())
        elif field == 5:
            reader.expect(field, wire, _LENGTH)
            value = reader.text()
        elif field == 6:
            reader.expect(field, wire, _LENGTH)
            value = _bytes(reader)
        else:
            reader.expect(field, wire, _LENGTH)
            value = _read_list(reader, field)
    if value is None:
        raise WireError("a record value holds nothing")
    return value


_METRIC_FIELDS = frozenset({1, 2, 3, 21, 22, 23})
_CONFIG_FIELDS = frozenset({1, 2, 3, 4, 5, 6, 21, 22, 23, 24, 25, 26})


def _read_record(reader: _Reader, kind: str) -> WireRecord:
    items: dict[str, Any] = {}
    for field, wire in reader:
        if field != 1 or wire != _LENGTH:
            raise _unknown(field, f"a {kind} record")
        item = reader.sub()
        key, value, has_value = "", None, False
        for number, item_wire in item:
            if number == 1:
                item.expect(number, item_wire, _LENGTH)
                key = item.text()
            elif number == 2:
                item.expect(number, item_wire, _LENGTH)
                inner = item.sub()
                has_value = True
                if kind == "array":
                    value = _read_array(inner)
                else:
                    value = _read_value(inner, _METRIC_FIELDS if kind == "metric" else _CONFIG_FIELDS)
            else:
                raise _unknown(number, f"a {kind} record item")
        if not has_value:
            raise WireError(f"{kind} record item {key!r} has no value")
        if key in items:
            raise WireError(f"{kind} record key {key!r} appears twice")
        items[key] = value
    return WireRecord(kind, tuple(items.items()))


_RECORD_KINDS = {2: "array", 3: "metric", 4: "config"}


def _read_recorddict(reader: _Reader) -> tuple[tuple[str, WireRecord], ...]:
    records: dict[str, WireRecord] = {}
    for field, wire in reader:
        if field != 1 or wire != _LENGTH:
            raise _unknown(field, "RecordDict")
        item = reader.sub()
        name, record = "", None
        for number, item_wire in item:
            if number == 1:
                item.expect(number, item_wire, _LENGTH)
                name = item.text()
            elif number in _RECORD_KINDS:
                if record is not None:
                    raise WireError(f"record {name!r} holds more than one record")
                item.expect(number, item_wire, _LENGTH)
                record = _read_record(item.sub(), _RECORD_KINDS[number])
            else:
                raise _unknown(number, "a RecordDict item")
        if record is None:
            raise WireError(f"record {name!r} holds no record")
        if name in records:
            raise WireError(f"record {name!r} appears twice")
        records[name] = record
    return tuple(records.items())


_METADATA_TEXT = {2: "message_id", 5: "reply_to_message_id", 6: "group_id", 8: "message_type"}
_METADATA_UINT = {1: "run_id", 3: "src_node_id", 4: "dst_node_id", 10: "src_task_id", 11: "dst_task_id"}
_METADATA_DOUBLE = {7: "ttl", 9: "created_at"}


def _read_metadata(reader: _Reader) -> WireMetadata:
    values: dict[str, Any] = {}
    for field, wire in reader:
        if field in _METADATA_TEXT:
            reader.expect(field, wire, _LENGTH)
            values[_METADATA_TEXT[field]] = reader.text()
        elif field in _METADATA_UINT:
            reader.expect(field, wire, _VARINT)
            values[_METADATA_UINT[field]] = reader.varint()
        elif field in _METADATA_DOUBLE:
            reader.expect(field, wire, _FIXED64)
            values[_METADATA_DOUBLE[field]] = struct.unpack("<d", reader.fixed64())[0]
        else:
            raise _unknown(field, "Metadata")
    return WireMetadata(**values)


def _view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view.toreadonly()


def parse_message(data: Buffer) -> WireMessage:
    """A Message's bytes to plain values; array data as read-only views of `data`."""
    reader = _Reader(_view(data), 0, len(data))
    metadata, content, error = None, None, None
    for field, wire in reader:
        reader.expect(field, wire, _LENGTH)
        if field == 1:
            metadata = _read_metadata(reader.sub())
        elif field == 2:
            content = _read_recorddict(reader.sub())
        elif field == 3:
            inner = reader.sub()
            code, reason = 0, ""
            for number, inner_wire in inner:
                if number == 1:
                    inner.expect(number, inner_wire, _VARINT)
                    code = _unzigzag(inner.varint())
                elif number == 2:
                    inner.expect(number, inner_wire, _LENGTH)
                    reason = inner.text()
                else:
                    raise _unknown(number, "Error")
            error = (code, reason)
        else:
            raise _unknown(field, "Message")
    if metadata is None:
        raise WireError("the message has no metadata")
    if (content is None) == (error is None):
        raise WireError("a message carries exactly one of content and error")
    return WireMessage(metadata, content, error)


def parse_recorddict(data: Buffer) -> tuple[tuple[str, WireRecord], ...]:
    return _read_recorddict(_Reader(_view(data), 0, len(data)))


def to_recorddict(records: Iterable[tuple[str, WireRecord]]) -> RecordDict:
    """Flower's records from parsed ones (the array data copied into bytes)."""
    content = RecordDict()
    for name, record in records:
        if record.kind == "array":
            arrays = {k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data.tobytes())
                      for k, a in record.items}  # fmt: skip
            content[name] = ArrayRecord(array_dict=arrays, keep_input=False)
        elif record.kind == "metric":
            content[name] = MetricRecord(record.as_dict(), keep_input=False)
        else:
            content[name] = ConfigRecord(record.as_dict(), keep_input=False)
    return content


__all__ = [
    "NUMPY_STYPE",
    "WireArray",
    "WireError",
    "WireMessage",
    "WireMetadata",
    "WireRecord",
    "encode_message",
    "encode_recorddict",
    "npy_array",
    "parse_message",
    "parse_recorddict",
    "to_recorddict",
]
