"""The byte formats of a ledger and their strict readers: entries, payload descriptors,
signed tree heads, the state document.

Every reader here takes untrusted bytes (a ledger copied from anywhere) and either returns a
typed value or raises `FormatError` saying what is wrong: no float, no missing or extra
field, no digest that is not 64 lowercase hex characters (digests name blob files), no
time that does not sort as text. Nothing here touches the disk."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from fedgate.canonical import canonical_json
from fedgate.ledger.signing import Verifier

HEAD_VERSION = 2
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")  # ASCII digits only
_DIGEST = re.compile(r"[0-9a-f]{64}")
HEAD_FIELDS = frozenset({"size", "root", "time", "key_id", "state_sha256"})
SIGNED_HEAD_FIELDS = HEAD_FIELDS | {"signature"}
PAYLOAD_FIELDS = frozenset({"sha256", "size"})
EMPTY_STATE = canonical_json({})
EMPTY_STATE_SHA256 = hashlib.sha256(EMPTY_STATE).hexdigest()


class FormatError(ValueError):
    """Bytes that are not what the ledger writes; the message says which part and why."""


def _fail(message: str) -> NoReturn:
    raise FormatError(message)


def utc_now() -> str:
    """Microsecond UTC time in the one text form that sorts as time does."""
    return datetime.now(UTC).strftime(TIME_FORMAT)


def check_time(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        _fail(f"{what} {value!r} is not a time of the form 2026-01-31T12:00:00.000000Z")
    try:
        datetime.strptime(value, TIME_FORMAT)
    except ValueError:
        _fail(f"{what} {value!r} is not a valid date and time")
    return value


def check_digest(value: object, what: str) -> str:
    """A SHA-256 hex digest; only these are ever turned into blob paths."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        _fail(f"{what} {value!r:.80} is not a SHA-256 digest (64 lowercase hex characters)")
    return value


def check_count(value: object, what: str) -> int:
    if type(value) is not int or value < 0:  # bool is an int in Python: refused too
        _fail(f"{what} {value!r:.40} is not a non-negative integer")
    return value


def _reject_constant(name: str) -> NoReturn:
    _fail(f"{name} is not a JSON number the ledger writes")


def _reject_float(text: str) -> NoReturn:
    _fail(f"the number {text:.40} is a float; the ledger holds none (they do not hash stably)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        _fail("a key appears twice in one object")
    return result


def strict_json(raw: object, what: str) -> Any:
    """Parse bytes the ledger wrote as canonical JSON, and insist they are exactly that."""
    if not isinstance(raw, bytes):
        _fail(f"{what} is stored as {type(raw).__name__}, not bytes")
    try:
        value = json.loads(
            raw,
            parse_float=_reject_float,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
        canonical = canonical_json(value)
    except FormatError as err:
        _fail(f"{what}: {err}")
    except RecursionError:
        _fail(f"{what} is nested too deeply")
    except (ValueError, TypeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _fail(f"{what} is not JSON: {err}")
    if canonical != raw:
        _fail(f"{what} is not in canonical form (altered?)")
    return value


def state_bytes(state: object) -> bytes:
    """The stored form of a state document (a JSON object, no floats)."""
    if not isinstance(state, dict):
        _fail(f"the state must be a JSON object, not {type(state).__name__}")
    try:
        return canonical_json(state)
    except (TypeError, ValueError, RecursionError) as err:
        _fail(f"the state is not canonical-JSON-safe: {err}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_state(raw: object) -> dict[str, Any]:
    value = strict_json(raw, "the state")
    if not isinstance(value, dict):
        _fail("the state is not a JSON object")
    return value


@dataclass(frozen=True)
class Payload:
    sha256: str
    size: int


@dataclass(frozen=True)
class Entry:
    """One parsed leaf: its exact bytes, the fields the ledger sets, and everything else."""

    raw: bytes
    seq: int
    time: str
    payloads: dict[str, Payload]
    fields: dict[str, Any]


def parse_entry(raw: object, index: int) -> Entry:
    fields = strict_json(raw, f"entry {index}")
    assert isinstance(raw, bytes)  # strict_json refused anything else
    if not isinstance(fields, dict):
        _fail(f"entry {index} is not a JSON object")
    for key in ("seq", "time", "payloads"):
        if key not in fields:
            _fail(f"entry {index} has no {key!r} field")
    seq = check_count(fields["seq"], f"entry {index}'s seq")
    if seq != index:
        _fail(f"entry {index} claims sequence {seq} (moved or duplicated)")
    time = check_time(fields["time"], f"entry {index}'s time")
    described = fields["payloads"]
    if not isinstance(described, dict):
        _fail(f"entry {index}'s payloads are not an object")
    payloads: dict[str, Payload] = {}
    for name, blob in described.items():
        what = f"entry {index}'s payload {name!r:.40}"
        if not isinstance(blob, dict) or set(blob) != PAYLOAD_FIELDS:
            _fail(f"{what} must be exactly {{sha256, size}}")
        payloads[name] = Payload(
            check_digest(blob["sha256"], f"{what} sha256"), check_count(blob["size"], f"{what} size")
        )
    return Entry(raw, seq, time, payloads, fields)


@dataclass(frozen=True)
class TreeHead:
    """What the hospital signs after each append: the tree's size and root, the time, its key,
    and the hash of the ledger's state document (so that the state cannot be reset either)."""

    size: int
    root: bytes
    time: str
    key_id: str
    state_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "time": self.time,
            "key_id": self.key_id,
            "state_sha256": self.state_sha256,
        }

    @property
    def signed_bytes(self) -> bytes:
        return canonical_json({"fedgate-tree-head": HEAD_VERSION, **self.to_json()})

    @classmethod
    def from_json(cls, data: object) -> TreeHead:
        """Strict: exactly the five fields, each of its type. FormatError otherwise."""
        if not isinstance(data, dict):
            _fail("a tree head is a JSON object")
        if set(data) != HEAD_FIELDS:
            missing, extra = sorted(HEAD_FIELDS - set(data)), sorted(set(data) - HEAD_FIELDS)
            _fail(f"a tree head has exactly {sorted(HEAD_FIELDS)} (missing {missing}, extra {extra})")
        return cls(
            check_count(data["size"], "tree head size"),
            bytes.fromhex(check_digest(data["root"], "tree head root")),
            check_time(data["time"], "tree head time"),
            check_digest(data["key_id"], "tree head key_id"),
            check_digest(data["state_sha256"], "tree head state_sha256"),
        )


@dataclass(frozen=True)
class SignedTreeHead:
    head: TreeHead
    signature: bytes

    def verify(self, verifier: Verifier) -> bool:
        return self.head.key_id == verifier.key_id and verifier.verify(self.signature, self.head.signed_bytes)

    def to_json(self) -> dict[str, Any]:
        return {**self.head.to_json(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, data: object) -> SignedTreeHead:
        """The JSON form (`fedgate ledger head`, a report's embedded head). FormatError if malformed."""
        if not isinstance(data, dict):
            _fail("a signed tree head is a JSON object")
        if set(data) != SIGNED_HEAD_FIELDS:
            missing, extra = sorted(SIGNED_HEAD_FIELDS - set(data)), sorted(set(data) - SIGNED_HEAD_FIELDS)
            _fail(f"a signed tree head has exactly {sorted(SIGNED_HEAD_FIELDS)} (missing {missing}, extra {extra})")
        head = TreeHead.from_json({k: v for k, v in data.items() if k != "signature"})
        return cls(head, parse_signature(data["signature"]))


def parse_signature(value: object) -> bytes:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{128}", value):
        return bytes.fromhex(value)
    if isinstance(value, bytes) and len(value) == 64:
        return value
    _fail("a signature is 64 bytes (128 lowercase hex characters)")


def parse_head_row(row: Sequence[object], what: str) -> SignedTreeHead:
    """A row (size, head, signature) of the tree_heads table: its size column must agree
    with the signed JSON."""
    if len(row) != 3:
        _fail(f"{what}: a tree head row has 3 columns, not {len(row)}")
    size, head, signature = row
    if not isinstance(signature, bytes):
        _fail(f"{what}: its signature is stored as {type(signature).__name__}, not bytes")
    data = strict_json(head, what)  # its messages name `what` already
    try:
        parsed = SignedTreeHead(TreeHead.from_json(data), parse_signature(signature))
    except FormatError as err:
        _fail(f"{what}: {err}")
    if size != parsed.head.size or type(size) is not int:
        _fail(f"{what}: its size column says {size!r:.40}, its signed JSON {parsed.head.size}")
    return parsed
