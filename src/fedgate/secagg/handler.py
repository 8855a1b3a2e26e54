"""SecAgg+ run by the hospital's gate: an `InstructionHandler` for `fedgate.executor.hospital`.

    setup, share_keys, unmask    answered by the gate itself: no sandbox starts, nothing of the
                                 ClientApp runs; keys in a `ClientSession` in this object's memory
    collect_masked_vectors       the gate admits the plain fit instruction, runs the ClientApp on it
                                 in the sandbox (without the SecAgg+ record: no ciphertext, no key
                                 reaches it), applies every rule (manifest, clip + noise, metrics,
                                 budget, review), and only then, in `finalize`, masks what passed
    any other train instruction  refused while SecAgg+ is required (`secagg.require`, or a
                                 distributed-noise policy, whose single replies are under-noised)

Every stage's reply passes an allow-list (`protocol.check_stage_reply`) and is a ledger entry
before it leaves. The masked reply's bound is the sum's (`accounting`), with its assumption."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedgate.errors import FedgateError, GateRefusal, PolicyError
from fedgate.flower_adapter import (
    SECAGG_CONFIGS,
    SecAggStage,
    make_reply,
    message_from_bytes,
    message_to_bytes,
    recorddict_to_bytes,
    refusal,
)
from fedgate.gate.decode import decode_record
from fedgate.gate.evidence import GateDecision, StageEvidence
from fedgate.gate.pipeline import GENERIC_REFUSAL, Admission, AppOutcome
from fedgate.gate.rules import jsonable
from fedgate.policy import Policy
from fedgate.secagg import legacy
from fedgate.secagg.accounting import SumBound, sum_bound
from fedgate.secagg.encoding import coordinates, encode_update
from fedgate.secagg.policy import SecAggPolicy
from fedgate.secagg.protocol import ClientSession, check_stage_reply, parse_setup, stage_of
from fedgate.secagg.records import KIND_SECAGG_REFUSED, KIND_SECAGG_REPLY, SECAGG_STAGE

if TYPE_CHECKING:
    from fedgate.executor.hospital import AppSource, Hospital

log = logging.getLogger("fedgate.secagg")
TRAIN = "train"


class SecAggError(FedgateError):
    """The instruction could not be read as a Flower message: nothing was recorded or sent."""


class SecAggHandler:
    """One per federation is enough (sessions are kept per hospital and run), one per hospital is
    the usual. `require`: every train instruction must come through SecAgg+."""

    def __init__(self, secagg: SecAggPolicy, *, require: bool | None = None) -> None:
        self.secagg = secagg
        self.require = secagg.require if require is None else require
        self._sessions: dict[tuple[str, int], ClientSession] = {}
        self._lock = threading.Lock()

    # -- InstructionHandler ----------------------------------------------------------------------

    def handles(self, instruction: bytes) -> bool:
        try:
            message = message_from_bytes(instruction)
        except ValueError:
            return False
        if not message.has_content():
            return False
        if SECAGG_CONFIGS in message.content:
            return True  # whatever its type: a SecAgg+ record never reaches the ClientApp
        return message.metadata.message_type == TRAIN and self.require

    def run(
        self,
        hospital: Hospital,
        instruction: bytes,
        context: bytes,
        arrived: float,
        app_source: AppSource | None,
    ) -> tuple[bytes, bytes | None]:
        try:
            message = message_from_bytes(instruction)
        except ValueError as err:
            raise SecAggError(f"the instruction is not a Flower message: {err}") from err
        record = message.content.get(SECAGG_CONFIGS) if message.has_content() else None
        if not isinstance(record, ConfigRecord):
            return self._refuse_plain(hospital, instruction, arrived), None
        key = (hospital.config.name, message.metadata.run_id)
        stage = "?"
        try:
            stage = stage_of(record)
            if message.metadata.message_type != TRAIN:
                raise GateRefusal("secagg-protocol", "a SecAgg+ record in a message that is not a train instruction")
            self._check_gate(hospital)
            if stage == SecAggStage.COLLECT_MASKED_VECTORS:
                return self._collect(hospital, key, message, record, context, arrived, app_source)
            session, content, evidence = self._key_stage(key, stage, message, record)
        except GateRefusal as err:
            self._end(key)
            return self._refuse_stage(hospital, message, instruction, stage, err), None
        except Exception as err:  # fail closed: whatever a stage chokes on is a recorded refusal, keys dropped
            self._end(key)
            refused = GateRefusal("secagg-error", f"{type(err).__name__}: {err}"[:500])
            return self._refuse_stage(hospital, message, instruction, stage, refused), None
        try:
            return self._send_stage(hospital, message, instruction, stage, session, content, evidence), None
        finally:
            if stage == SecAggStage.UNMASK:
                self._end(key)  # the round is over for this hospital: its keys go

    # -- the key stages: the gate's own replies ---------------------------------------------------

    def _check_gate(self, hospital: Hospital) -> None:
        gate = hospital.gate
        state = gate.state()
        if state.halted:
            raise GateRefusal("halted", f"this hospital's gate is halted: {state.halt_reason}")
        if TRAIN not in gate.policy.allowed_types:
            raise GateRefusal("message-type", "the policy does not answer train messages")

    def _key_stage(
        self, key: tuple[str, int], stage: str, message: Message, record: ConfigRecord
    ) -> tuple[ClientSession, RecordDict, dict[str, Any]]:
        meta = message.metadata
        if stage == SecAggStage.SETUP:
            params = parse_setup(record, meta.dst_node_id, meta.group_id, self.secagg)
            self._end(key)  # a new round (or a restarted one): the old keys go
            session = ClientSession.start(params)
            with self._lock:
                self._sessions[key] = session
            return session, _configs(session.setup_reply()), params.to_json()
        session = self._session(key, message)
        if stage == SecAggStage.SHARE_KEYS:
            reply = session.share_keys(record)
            return session, _configs(reply), {"neighbours": [*sorted(reply["dsts"]), session.node_id]}
        reply = session.unmask(record)
        return session, _configs(reply), dict(session.unmasked)

    def _session(self, key: tuple[str, int], message: Message) -> ClientSession:
        with self._lock:
            session = self._sessions.get(key)
        if session is None:
            raise GateRefusal("secagg-protocol", "no SecAgg+ round of this run is in progress at this hospital")
        meta = message.metadata
        if meta.dst_node_id != session.node_id or meta.group_id != session.params.group_id:
            raise GateRefusal("secagg-protocol", "a SecAgg+ message for another node or round")
        return session

    def _end(self, key: tuple[str, int]) -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close()

    def _fields(self, hospital: Hospital, message: Message, raw: bytes, stage: str, kind: str) -> dict[str, Any]:
        meta = message.metadata
        return {
            "kind": kind,
            "stage": stage,
            "run_id": meta.run_id,
            "hospital": hospital.config.name,
            "destination": hospital.config.destination,
            "node_id": meta.dst_node_id,
            "instruction": {
                "sha256": hashlib.sha256(raw).hexdigest(),
                "message_id": meta.message_id,
                "message_type": meta.message_type[:200],
                "group_id": meta.group_id[:200],
            },
            "bits": "0",
            "policy_hash": hospital.gate.policy.hash,
        }

    def _send_stage(
        self,
        hospital: Hospital,
        message: Message,
        raw: bytes,
        stage: str,
        session: ClientSession,
        content: RecordDict,
        evidence: dict[str, Any],
    ) -> bytes:
        payload = recorddict_to_bytes(content)
        try:
            check_stage_reply(stage, content, session, payload)
        except GateRefusal as err:
            self._end((hospital.config.name, message.metadata.run_id))
            return self._refuse_stage(hospital, message, raw, stage, err)
        fields = {**self._fields(hospital, message, raw, stage, KIND_SECAGG_REPLY), "evidence": jsonable(evidence)}
        hospital.gate.ledger.append(fields, {"sent": payload})  # durable before it leaves
        return message_to_bytes(make_reply(message, time.time(), content, None))

    def _refuse_stage(self, hospital: Hospital, message: Message, raw: bytes, stage: str, err: GateRefusal) -> bytes:
        fields = {
            **self._fields(hospital, message, raw, stage, KIND_SECAGG_REFUSED),
            "rule": err.rule,
            "reason": str(err)[:2000],
            "detail": jsonable(err.detail),
        }
        hospital.gate.ledger.append(fields)
        log.warning("%s: refused SecAgg+ %s: %s", hospital.config.name, stage, err)
        return message_to_bytes(refusal(message, time.time(), GENERIC_REFUSAL))

    # -- collect: the ClientApp, every rule, then the mask --------------------------------------------

    def _collect(
        self,
        hospital: Hospital,
        key: tuple[str, int],
        message: Message,
        record: ConfigRecord,
        context: bytes,
        arrived: float,
        app_source: AppSource | None,
    ) -> tuple[bytes, bytes | None]:
        session = self._session(key, message)
        session.receive_shares(record)
        plain, for_rules, _ = legacy.split_instruction(message)
        gate = hospital.gate
        # the bound and ε of what leaves are the sum's (at least t honest replies in it): budgets
        # and max_epsilon are checked against those, before the ClientApp runs
        admission = gate.admit(message_to_bytes(for_rules), arrived, honest_in_sum=self.secagg.assumed_honest)
        outcome: AppOutcome | None = None
        state: bytes | None = None
        bound: SumBound | None = None
        if admission.refusal is None and admission.instruction is not None:
            bound = sum_bound(gate.policy.clip_norm, gate.policy.sigma, coordinates(admission.instruction.model),
                              self.secagg.assumed_honest, session.params.threshold)  # fmt: skip
            if not math.isclose(bound.sum_bits, admission.bound.update_bits, rel_tol=1e-12):
                raise GateRefusal("secagg-bound", "the admitted bound is not the sum's bound")
            ran, state = hospital.sandboxed(message_to_bytes(plain), context, admission.run_id, app_source, arrived,
                                            kind=admission.message_type)  # fmt: skip
            outcome = _for_rules(ran)
        chosen = bound

        def finalize(content: RecordDict, decision: GateDecision) -> tuple[RecordDict, GateDecision]:
            assert chosen is not None
            return _mask(session, admission, chosen, content, decision)

        result = gate.conclude(admission, outcome, finalize, review_note(session.params.threshold))
        if result.message is None:
            raise SecAggError("the instruction could not be read as a Flower message; nothing was sent")
        if not result.decision.sent:
            self._end(key)  # dropped from this round: its keys go, it will not be asked to unmask
        return message_to_bytes(result.message), state

    def _refuse_plain(self, hospital: Hospital, raw: bytes, arrived: float) -> bytes:
        """A train instruction outside SecAgg+: recorded and refused like any reply the rules refuse."""
        gate = hospital.gate
        admission = gate.admit(raw, arrived)
        outcome = None
        if admission.refusal is None:
            why = "this hospital sends train replies only through secure aggregation (secagg.require)"
            outcome = AppOutcome(None, why, "secagg-required", {"mode": "none", "enforced": True})
        result = gate.conclude(admission, outcome)
        if result.message is None:
            raise SecAggError("the instruction could not be read as a Flower message; nothing was sent")
        return message_to_bytes(result.message)


def review_note(threshold: int) -> str:
    """What the review page says happens to an approved update (SecAgg+ masks it after review)."""
    return (
        "This hospital takes part in secure aggregation (SecAgg+, run by its gate). What you see is the gated "
        "update before masking. If you approve, the gate adds masks to exactly these values (as integers mod "
        "2^64; ChaCha20 under keys that only this gate holds, never the research team's code) and what leaves "
        "is the masked vector, with the quantised metrics and num-examples shown here in the clear. The server "
        f"can remove the masks only from the sum of at least {threshold} hospitals' vectors. The ledger records "
        "both: these bytes (review-held) and the masked bytes that leave (reply-sent)."
    )


def _configs(values: dict[str, Any]) -> RecordDict:
    return RecordDict({SECAGG_CONFIGS: ConfigRecord(values)})


def _for_rules(ran: AppOutcome) -> AppOutcome:
    """The sandbox's legacy reply as the reply the rules read; a layout it may not have is refused."""
    if ran.reply is None:
        return ran
    try:
        return dataclasses.replace(ran, reply=legacy.reply_for_rules(ran.reply))
    except GateRefusal as err:
        return dataclasses.replace(ran, reply=None, error=str(err)[:2000], rule=err.rule)
    except Exception as err:  # fail closed: a reply the translation cannot read
        return dataclasses.replace(ran, reply=None, error=f"{type(err).__name__}: {err}"[:2000], rule="legacy-layout")


def _mask(
    session: ClientSession, admission: Admission, bound: SumBound, content: RecordDict, decision: GateDecision
) -> tuple[RecordDict, GateDecision]:
    """After every rule: the released update, exactly, as integers, masked; the metrics and
    num_examples the rules produced in the clear; and the evidence, bound and assumption."""
    instruction = admission.instruction
    assert instruction is not None
    update = next(stage.detail for stage in decision.stages if stage.stage == "update")
    grid_log2 = update.get("grid_step_log2")
    if (grid_log2 is None) != (bound.grid_step == 0.0) or (
        grid_log2 is not None and math.ldexp(1.0, int(grid_log2)) != bound.grid_step
    ):
        raise GateRefusal("secagg-bound", "the noise stage's grid is not the one the bound was computed for")
    released = decode_record(content[instruction.model_key])  # type: ignore[arg-type]
    params = session.params
    vector = encode_update(instruction.model, released, grid_log2, params.step_log2, params.sample_num)
    masked = session.mask(vector)
    metrics_record = content["metrics"]
    assert isinstance(metrics_record, MetricRecord)
    metrics = {str(k): v for k, v in metrics_record.items() if type(v) in (int, float)}
    out = legacy.masked_reply(masked.astype("<u8").tobytes(), metrics)  # type: ignore[arg-type]
    check_stage_reply(SecAggStage.COLLECT_MASKED_VECTORS, out, session, recorddict_to_bytes(out))
    evidence = {
        **params.to_json(),
        "masked_coordinates": int(vector.size),
        "neighbours_masked": session.neighbours_masked,
        "weighting": "equal (the sum of released updates; num_examples sent in the clear, quantised)",
        "bound": bound.to_json(),
    }
    stage = StageEvidence(SECAGG_STAGE, True, jsonable(evidence))
    return out, dataclasses.replace(decision, stages=(*decision.stages, stage))


def handlers_for(policy: Policy, secagg: SecAggPolicy) -> tuple[SecAggHandler, ...]:
    """The hospital's handlers for its policy: none when SecAgg+ is off. A distributed-noise policy
    requires SecAgg+ for every train reply, whatever `secagg.require` says."""
    if not secagg.enabled:
        return ()
    if policy.training.allows_trusted:  # parse_policy refuses this; a Policy built in code must not get round it
        raise PolicyError("SecAgg+ runs the research team's ClientApp, which trusted training mode forbids")
    return (SecAggHandler(secagg, require=secagg.require or policy.noise_mode == "distributed"),)


__all__ = ["SecAggError", "SecAggHandler", "handlers_for"]
