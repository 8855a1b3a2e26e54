"""Frames over inherited pipes: a 4-byte big-endian length, then the bytes. A frame is
either a small JSON object (control) or a Flower protobuf (message, context). Never pickle.

The reading side is strict: a maximum size per frame, a deadline for the whole exchange
(poll, no helper thread that could outlive it and read the next task's bytes), and the
caller names exactly which frames it expects."""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

CONTROL_MAX = 64 * 1024  # a JSON control frame is small; anything bigger is a protocol violation


class WireError(OSError):
    """The other side closed the pipe, overran a limit, missed the deadline or sent
    something that is not the frame expected. The message says which."""


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireError("deadline passed while reading a frame")
            if not poller.poll(left * 1000):
                raise WireError("deadline passed while reading a frame")
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise WireError("the pipe closed in the middle of a frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send_bytes(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    if len(view) >= 1 << 32:
        raise WireError(f"frame of {len(view)} bytes cannot be framed")
    os.write(fd, struct.pack(">I", len(view)))
    while view:
        written = os.write(fd, view[: 1 << 20])
        view = view[written:]


def recv_bytes(fd: int, max_size: int, deadline: float | None = None) -> bytes:
    (length,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    if length > max_size:
        raise WireError(f"frame of {length} bytes is over the limit of {max_size}")
    return _read_exact(fd, length, deadline)


def send_json(fd: int, value: dict[str, Any]) -> None:
    send_bytes(fd, json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def recv_json(fd: int, deadline: float | None = None, keys: frozenset[str] | None = None) -> dict[str, Any]:
    """A JSON object frame; with `keys`, it must have exactly those keys."""
    raw = recv_bytes(fd, CONTROL_MAX, deadline)
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise WireError(f"expected a JSON frame: {err}") from err
    if not isinstance(value, dict):
        raise WireError("expected a JSON object frame")
    if keys is not None and set(value) != keys:
        raise WireError(f"control frame has keys {sorted(value)}, expected {sorted(keys)}")
    return value


def nothing_pending(fd: int) -> bool:
    """True when no byte waits on `fd` (a frame the protocol did not ask for is a violation)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)
