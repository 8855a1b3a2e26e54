"""The single seam through which every reply leaves a hospital, in both executors.

    reply = client_app(instruction)          # untrusted code, in process or in the sandbox
    outgoing = pipeline.process(instruction, reply)
    send(outgoing)                           # only after process() returned

`process` applies the gate's rules (`decide`), records the exact outgoing bytes and the
evidence in the hospital's ledger (durable before it returns) and builds the message to
send: the checked, transformed reply, or an error reply with a generic reason."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedgate.canonical import decimal_str
from fedgate.gate.decide import REFUSED_BOUND, GateHistory, decide, message_category
from fedgate.gate.evidence import GateDecision, StageEvidence
from fedgate.gate.manifest import Manifest
from fedgate.gate.update import fresh_generator
from fedgate.ledger.store import Ledger
from fedgate.policy import Policy
from fedgate.review.queue import APPROVED, REJECTED, ReviewItem, ReviewQueue

log = logging.getLogger("fedgate.gate")

GENERIC_REFUSAL = "refused by the hospital's egress gate"
REFUSAL_CODE = ErrorCode.MOD_FAILED_PRECONDITION
LEDGER_DIR = "ledger"
KIND_SENT = "reply-sent"
KIND_REFUSED = "reply-refused"
KIND_REVIEW = "review-decision"
KIND_POLICY = "policy"


def content_bytes(content: RecordDict) -> bytes:
    """The exact protobuf bytes of a reply's content (Flower's own serde; no pickle)."""
    return bytes(recorddict_to_proto(content).SerializeToString())


def content_from_bytes(data: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


def tensor_table(instruction: Message, content: RecordDict) -> list[dict[str, Any]]:
    """Per tensor of the outgoing model: name, shape, dtype and the L2 norm of its update."""
    rows: list[dict[str, Any]] = []
    for name, record in content.array_records.items():
        base = instruction.content.array_records[name]
        for spec in Manifest.of(record).tensors:
            sent, before = record[spec.name].numpy(), base[spec.name].numpy()
            norm = math.sqrt(float(((sent.astype("float64") - before.astype("float64")) ** 2).sum()))
            rows.append(
                {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype, "update_l2": decimal_str(norm)}
            )
    return rows


def server_round(instruction: Message) -> int:
    if instruction.has_content():
        for record in instruction.content.values():
            if isinstance(record, ConfigRecord) and "server-round" in record:
                return int(record["server-round"])  # type: ignore[arg-type]
    return 0


def history_from_entries(entries: Iterable[dict[str, Any]], run_id: int, policy: Policy) -> GateHistory:
    """What the gate must remember, rebuilt from the ledger so that a crash loses nothing."""
    pinned, bits, halted = "", 0.0, False
    for entry in entries:
        if entry.get("run_id") != run_id or entry.get("kind") not in (KIND_SENT, KIND_REFUSED):
            continue
        decision = entry["decision"]
        if entry["kind"] == KIND_SENT:
            bits += float(decision["bound"]["total_bits"])
            pinned = pinned or decision["manifest_hash"]
        elif policy.on_refusal == "halt":
            halted = True
    return GateHistory(pinned_manifest=pinned, cumulative_bits=bits, halted=halted)


@dataclass(frozen=True)
class Outcome:
    message: Message
    decision: GateDecision
    seq: int
    cumulative_bits: float


class GatePipeline:
    """One hospital's gate. Cheap to build; the ledger connection opens on first use."""

    def __init__(
        self,
        policy: Policy,
        hospital_dir: Path,
        hospital: str,
        destination: str,
    ) -> None:
        self.policy = policy
        self.hospital_dir = Path(hospital_dir)
        self.hospital = hospital
        self.destination = destination
        self._ledger: Ledger | None = None
        self._queue: ReviewQueue | None = None

    @property
    def review_queue(self) -> ReviewQueue:
        if self._queue is None:
            self._queue = ReviewQueue(self.hospital_dir)
        return self._queue

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.hospital_dir / LEDGER_DIR)
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def process(
        self, instruction: Message, reply: Message | BaseException, executor: dict[str, Any] | None = None
    ) -> Message:
        return self.process_with_evidence(instruction, reply, executor).message

    def process_with_evidence(
        self, instruction: Message, reply: Message | BaseException, executor: dict[str, Any] | None = None
    ) -> Outcome:
        """`executor`: how the reply was produced (e.g. the sandbox's isolation layers),
        recorded in the ledger entry beside the gate's decision."""
        if isinstance(reply, BaseException):
            reason = f"{type(reply).__name__}: {reply}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=instruction)
        run_id = instruction.metadata.run_id
        entries = self.ledger.entries()
        self._record_policy(entries, run_id)
        history = history_from_entries(entries, run_id, self.policy)
        decision, content = decide(instruction, reply, self.policy, history, fresh_generator())
        rejected: RecordDict | None = None
        if content is not None and self.policy.review_required(server_round(instruction), decision.warnings):
            item = self._hold_for_review(instruction, decision, content, history.cumulative_bits)
            self._record_review(entries, instruction, item)
            if item.status == APPROVED:
                content = content_from_bytes(item.payload)  # exactly the bytes the reviewer saw
            else:
                rule = "review-rejected" if item.status == REJECTED else "review-timeout"
                stage = StageEvidence(rule, False, {"item": item.id, "reviewer": item.reviewer, "reason": item.reason})
                decision = dataclasses.replace(
                    decision,
                    sent=False,
                    stages=(*decision.stages, stage),
                    bound=REFUSED_BOUND,
                    rule=rule,
                    reason=f"[{rule}] {item.reviewer or 'nobody'} decided {item.status}: {item.reason}",
                )
                rejected, content = content, None
        if content is not None:
            outgoing = Message(content, reply_to=instruction)
            payloads = {"sent": content_bytes(content)}
            object_id = content.object_id
        else:
            outgoing = Message(Error(code=REFUSAL_CODE, reason=GENERIC_REFUSAL), reply_to=instruction)
            payloads = {}
            object_id = ""
            if rejected is not None:
                payloads["refused"] = content_bytes(rejected)
            elif reply.has_content():  # kept locally so the hospital can see what was stopped
                payloads["refused"] = content_bytes(reply.content)
        cumulative = history.cumulative_bits + (decision.bound.total if decision.sent else 0.0)
        fields = {
            "kind": KIND_SENT if decision.sent else KIND_REFUSED,
            "run_id": run_id,
            "round": server_round(instruction),
            "node_id": instruction.metadata.dst_node_id,
            "hospital": self.hospital,
            "destination": self.destination,
            "message_type": instruction.metadata.message_type,
            "instruction_id": instruction.metadata.message_id,
            "content_object_id": object_id,
            "policy_hash": self.policy.hash,
            "decision": decision.to_json(),
            "cumulative_bits": decimal_str(cumulative),
            "executor": executor or {},
        }
        receipt = self.ledger.append(fields, payloads)  # durable before anything is handed on
        if not decision.sent:
            log.warning("%s: refused a %s reply: %s", self.hospital, decision.message_type, decision.reason)
        return Outcome(outgoing, decision, receipt.seq, cumulative)

    def _record_policy(self, entries: list[dict[str, Any]], run_id: int) -> None:
        """The full policy goes into the ledger once per run, so a report can show it."""
        mine = (KIND_POLICY, run_id, self.policy.hash)
        if any((e.get("kind"), e.get("run_id"), e.get("policy_hash")) == mine for e in entries):
            return
        fields = {"kind": KIND_POLICY, "run_id": run_id, "hospital": self.hospital, "policy_hash": self.policy.hash}
        self.ledger.append({**fields, "policy": self.policy.to_json()})

    def _hold_for_review(
        self, instruction: Message, decision: GateDecision, content: RecordDict, cumulative_before: float
    ) -> ReviewItem:
        summary = {
            "run_id": instruction.metadata.run_id,
            "round": server_round(instruction),
            "hospital": self.hospital,
            "destination": self.destination,
            "message_type": instruction.metadata.message_type,
            "tensors": tensor_table(instruction, content),
            "metrics": {k: decimal_str(float(v)) for r in content.metric_records.values() for k, v in r.items()},  # type: ignore[arg-type]
            "decision": decision.to_json(),
            "bits_this_reply": decimal_str(decision.bound.total),
            "bits_cumulative": decimal_str(cumulative_before + decision.bound.total),
            "policy_hash": self.policy.hash,
        }
        queue = self.review_queue
        item = queue.submit(
            instruction.metadata.message_id,
            self.hospital,
            summary,
            content_bytes(content),
            self.policy.review_timeout_s,
        )
        log.warning("%s: reply for round %s held for review (item %d)", self.hospital, summary["round"], item.id)
        return queue.wait(item.id)  # Flower's task heartbeat, where there is one, runs on its own thread

    def _record_review(self, entries: list[dict[str, Any]], instruction: Message, item: ReviewItem) -> None:
        """The decision, who made it and when go into the ledger before the reply moves on
        (once: a node that restarts finds the item already decided)."""
        instruction_id = instruction.metadata.message_id
        if any(e.get("kind") == KIND_REVIEW and e.get("instruction_id") == instruction_id for e in entries):
            return
        self.ledger.append(
            {
                "kind": KIND_REVIEW,
                "run_id": instruction.metadata.run_id,
                "round": server_round(instruction),
                "hospital": self.hospital,
                "instruction_id": instruction_id,
                "item": item.id,
                "status": item.status,
                "reviewer": item.reviewer,
                "reason": item.reason,
                "decided_at": item.decided_at,
                "reviewed_sha256": hashlib.sha256(item.payload).hexdigest(),
                "policy_hash": self.policy.hash,
            }
        )


__all__ = ["GENERIC_REFUSAL", "GatePipeline", "Outcome", "content_bytes", "content_from_bytes", "message_category"]
