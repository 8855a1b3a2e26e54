"""What the rules let through, before it is a Flower object, and the bytes that leave.

The fast path (issue 15): the noised model is written straight into the buffer that leaves
(`codec.LaidOutReply`), and the ledger records a view of that same buffer. A reply that is
held for review or finalised (SecAgg+ masks it) becomes a Flower RecordDict first
(`record_dict`), and is encoded from that, as before."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedgate.gate.codec import LaidOutReply, encode_message, npy_array
from fedgate.gate.decode import METRICS_KEY, Instruction


@dataclass(frozen=True)
class CheckedContent:
    """The reply's content as the rules left it: the outgoing model (read-only; views of
    `laid`'s buffer when there is one) and the canonical metrics."""

    model_key: str
    model: OrderedDict[str, np.ndarray] | None
    metrics: dict[str, float | int]
    laid: LaidOutReply | None = None

    def __post_init__(self) -> None:
        if self.model is not None and self.model_key == METRICS_KEY:  # decode_instruction refuses it first
            raise ValueError(f"the model record cannot be named {METRICS_KEY!r}")

    def record_dict(self) -> RecordDict:
        """The content as a Flower RecordDict (copies the model once)."""
        content = RecordDict()
        if self.model is not None:
            content[self.model_key] = ArrayRecord(
                OrderedDict((n, npy_array(np.ascontiguousarray(v))) for n, v in self.model.items())
            )
        content[METRICS_KEY] = MetricRecord(dict(self.metrics))
        return content


def lay_out(instruction: Instruction, headroom: int) -> LaidOutReply | None:
    """A buffer for the reply to `instruction`, its model's arrays where they will lie on the
    wire; None where the model cannot be laid out (the slow path then encodes a RecordDict)."""
    if instruction.manifest is None or not instruction.model_key:
        return None
    specs = [(name, value.dtype, tuple(value.shape)) for name, value in instruction.model.items()]
    try:
        return LaidOutReply(instruction.model_key, specs, headroom)
    except (ValueError, OverflowError):  # a header numpy writes in another .npy version, or too big
        return None


def message_headroom(reply: Message) -> int:
    """Room for the message around the content: `reply`'s metadata as encoded (its created_at
    and ttl take at most 9 bytes each whatever their value) and two tags, with slack."""
    head, _ = encode_message(reply)
    return len(head) + 32


def wire_of(content: CheckedContent, reply: Message) -> tuple[memoryview, slice] | None:
    """The bytes of `reply` (gate metadata) carrying `content`, from the laid-out buffer; None
    when there is none or it cannot take them (the caller encodes the slow way)."""
    if content.laid is None:
        return None
    try:
        content.laid.finish(RecordDict({METRICS_KEY: MetricRecord(dict(content.metrics))}))
        return content.laid.wire(reply.metadata)
    except ValueError:
        return None


__all__ = ["METRICS_KEY", "CheckedContent", "lay_out", "message_headroom", "wire_of"]
