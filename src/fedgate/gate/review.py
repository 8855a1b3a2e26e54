"""Human review bound to bytes. Before waiting, the gate records a `review-held` ledger entry
with the exact payload that would leave; a person approves or rejects it on the review page;
only a payload whose SHA-256 equals a held one is ever sent — and it is sent from the gate's
own copy in the ledger's blob store, never from the review queue (a file anyone with access
to the hospital folder could edit)."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import RecordDict

from fedgate.canonical import decimal_str
from fedgate.errors import GateRefusal
from fedgate.flower_adapter import recorddict_from_bytes, recorddict_to_bytes
from fedgate.gate.entries import KIND_REVIEW, KIND_REVIEW_HELD, ReviewEntry, read_entries
from fedgate.gate.evidence import GateDecision, StageEvidence
from fedgate.review.queue import APPROVED, REJECTED, ReviewQueue

log = logging.getLogger("fedgate.review")

if TYPE_CHECKING:
    from fedgate.gate.pipeline import Admission, GatePipeline


def tensor_table(admission: Admission, content: RecordDict) -> list[dict[str, Any]]:
    """Per tensor of the outgoing model: name, shape, dtype and the L2 norm of its update."""
    rows: list[dict[str, Any]] = []
    instruction = admission.instruction
    if instruction is None or not instruction.model_key:
        return rows
    for name, array in content.array_records[instruction.model_key].items():
        sent = array.numpy()
        before = instruction.model[name]
        norm = math.sqrt(float(np.sum((sent.astype(np.float64) - before.astype(np.float64)) ** 2)))
        rows.append({"name": name, "shape": list(sent.shape), "dtype": str(sent.dtype), "update_l2": decimal_str(norm)})
    return rows


def hold_for_review(
    gate: GatePipeline, admission: Admission, decision: GateDecision, content: RecordDict, review_note: str = ""
) -> tuple[GateDecision, RecordDict | None]:
    """`review_note`: what the gate still does to an approved payload before it leaves (SecAgg+
    masks it), in words for the page; empty when exactly the held bytes leave."""
    payload = recorddict_to_bytes(content)
    held = hashlib.sha256(payload).hexdigest()
    message = admission.message
    assert message is not None
    instruction_id = message.metadata.message_id
    instruction_sha256 = admission.sha256
    common = {
        "run_id": message.metadata.run_id,
        "instruction_id": instruction_id,
        "instruction_sha256": instruction_sha256,
        "gate_round": admission.gate_round,
    }
    gate.record_review({"kind": KIND_REVIEW_HELD, **common, "policy_hash": gate.policy.hash}, {"held": payload})
    metrics = content.metric_records.get("metrics")
    summary = {
        "run_id": message.metadata.run_id,
        "round": admission.gate_round,
        "server_round": admission.instruction.server_round if admission.instruction else "",
        "hospital": gate.hospital,
        "destination": gate.destination,
        "message_type": message.metadata.message_type,
        "tensors": tensor_table(admission, content),
        "metrics": {k: decimal_str(float(v)) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
        "decision": decision.to_json(),
        "bits_this_reply": decimal_str(decision.bound.total),
        "bits_cumulative": decimal_str(admission.state.cumulative_bits + decision.bound.total),
        "policy_hash": gate.policy.hash,
        "payload_sha256": held,
        "after_review": review_note,
    }
    queue = ReviewQueue(gate.hospital_dir)
    try:
        item = queue.submit(instruction_id, gate.hospital, summary, payload, gate.policy.review_timeout_s)
        log.warning(
            "%s: a reply (gate round %d) is held for review; decide with `fedgate review %s` "
            "(refused if undecided after %.0f s)",
            gate.hospital,
            admission.gate_round,
            gate.hospital_dir.parent,
            gate.policy.review_timeout_s,
        )
        item = queue.wait(item.id)
    finally:
        queue.close()
    shown = hashlib.sha256(item.payload).hexdigest()
    sendable = _held_payload(gate, instruction_id, instruction_sha256, shown, held, payload)
    gate.record_review(
        {
            "kind": KIND_REVIEW,
            **common,
            "item": item.id,
            "status": item.status,
            "reviewer": item.reviewer,
            "reason": item.reason,
            "decided_at": item.decided_at,
            "reviewed_sha256": shown,
            "held_sha256": held,
            "policy_hash": gate.policy.hash,
        }
    )
    if item.status == APPROVED and sendable is not None:
        return decision, recorddict_from_bytes(sendable)
    if item.status == APPROVED:
        refusal = GateRefusal(
            "review-tampered", "the approved payload is not one the gate held", shown=shown, held=held
        )
    else:
        rule = "review-rejected" if item.status == REJECTED else "review-timeout"
        refusal = GateRefusal(rule, f"{item.reviewer or 'nobody'} decided {item.status}: {item.reason}")
    stage = StageEvidence(refusal.rule, False, {"item": item.id, "reviewer": item.reviewer, "shown": shown})
    return replace(decision, sent=False, stages=(*decision.stages, stage), rule=refusal.rule, reason=str(refusal)), None


def _held_payload(
    gate: GatePipeline, instruction_id: str, instruction_sha256: str, shown: str, held: str, payload: bytes
) -> bytes | None:
    """The bytes to send when the reviewer approved the item showing `shown`: this reply's own
    payload, or — after a restart, when the queue kept the item of an earlier attempt — the
    payload an earlier `review-held` entry of the same instruction (same id and same bytes)
    recorded, read from the blob store and checked against its hash (a blob file edited after
    it was held is never sent)."""
    if shown == held:
        return payload
    for entry in read_entries(gate.ledger):
        if (
            isinstance(entry, ReviewEntry)
            and entry.kind == KIND_REVIEW_HELD
            and entry.instruction_id == instruction_id
            and entry.instruction_sha256 == instruction_sha256
            and entry.payload_sha256 == shown
        ):
            blob = gate.ledger.blobs.get(shown)
            return blob if hashlib.sha256(blob).hexdigest() == shown else None
    return None
