"""Frames over an inherited pipe: 4-byte big-endian length, then the bytes. A frame is either
canonical JSON (headers) or a Flower protobuf (messages, contexts). Never pickle."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

MAX_FRAME = 1 << 31  # a 2 GiB model is the most we accept in one frame


class WireError(OSError):
    """The other side closed the pipe or sent something that is not a frame."""


def _read_exact(fd: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise WireError("the pipe closed in the middle of a frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send_bytes(fd: int, data: bytes) -> None:
    if len(data) >= MAX_FRAME:
        raise WireError(f"frame of {len(data)} bytes is over the limit")
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def recv_bytes(fd: int) -> bytes:
    (length,) = struct.unpack(">I", _read_exact(fd, 4))
    if length >= MAX_FRAME:
        raise WireError(f"frame of {length} bytes is over the limit")
    return _read_exact(fd, length)


def send_json(fd: int, value: dict[str, Any]) -> None:
    send_bytes(fd, json.dumps(value, sort_keys=True).encode())


def recv_json(fd: int) -> dict[str, Any]:
    try:
        value = json.loads(recv_bytes(fd))
    except ValueError as err:
        raise WireError(f"expected a JSON frame: {err}") from err
    if not isinstance(value, dict):
        raise WireError("expected a JSON object frame")
    return value
