"""The one seam every reply passes, in both executors:

    admission = gate.admit(instruction_bytes)        # before any untrusted code runs
    outcome = <run the ClientApp in the sandbox>      # only if admission.refusal is None
    result = gate.conclude(admission, outcome)        # rules, review, ledger (durable), release
    send(result.message)                              # built from the instruction and gate values only

`admit` refuses what needs no reply to refuse (a halted hospital, an unapproved model, a
malformed or non-finite instruction, a spent budget). `conclude` decodes the reply's bytes,
applies the rules, holds it for review when the policy says so, appends the ledger entry
(fsynced, with the gate's new state in the same transaction) and waits for the release slot.
Nothing fails open: any error on this path is a recorded refusal, and if even the ledger
fails, the executor sends the generic refusal and nothing else."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import numpy as np
from flwr.app import Message, RecordDict

from fedgate.canonical import decimal_str
from fedgate.errors import GENERIC_REFUSAL, GateRefusal, LedgerError
from fedgate.flower_adapter import make_reply, message_from_bytes, message_head, refusal
from fedgate.gate import accounting, rules
from fedgate.gate.accounting import PrivacyPlan
from fedgate.gate.audit import AUDIT_DIR, ImageSource, audit_stage
from fedgate.gate.codec import encode_message
from fedgate.gate.decode import Instruction, decode_instruction, decode_reply, literal_round
from fedgate.gate.entries import KIND_POLICY, KIND_REFUSED, KIND_REVIEW, KIND_REVIEW_HELD, KIND_SENT
from fedgate.gate.evidence import Bound, GateDecision, StageEvidence
from fedgate.gate.noise import NoiseSource
from fedgate.gate.outgoing import CheckedContent, lay_out, message_headroom, wire_of
from fedgate.gate.release import Release, after_review, schedule, wait_until
from fedgate.gate.review import hold_for_review
from fedgate.gate.state import GateState
from fedgate.gate.update import PredrawnNoise
from fedgate.ledger.store import Ledger
from fedgate.policy import Policy
from fedgate.privacy import DpSgdEvent

log = logging.getLogger("fedgate.gate")

Finalize = Callable[[RecordDict, "GateDecision"], tuple[RecordDict, "GateDecision"]]
LEDGER_DIR = "ledger"


@dataclass(frozen=True)
class AppOutcome:
    """What running the ClientApp gave: the reply's bytes, or why there are none, and how
    it was isolated (recorded with the reply)."""

    reply: bytes | None
    error: str = ""
    rule: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    raw: bytes
    message: Message | None
    arrived: float
    state: GateState
    instruction: Instruction | None = None
    refusal: GateRefusal | None = None
    bound: Bound = field(default_factory=Bound)
    gate_round: int = 0
    stages: tuple[StageEvidence, ...] = ()
    privacy: PrivacyPlan | None = None  # what sending costs in ε (None: no update is released)
    digest: InstructionDigest | None = None  # set in __post_init__: the SHA-256 of `raw`, recorded
    noise: PredrawnNoise | None = None  # the reply's noise, drawn while the ClientApp runs

    def __post_init__(self) -> None:
        if self.digest is None:
            object.__setattr__(self, "digest", InstructionDigest(self.raw))

    @property
    def run_id(self) -> int:
        return self.message.metadata.run_id if self.message is not None else 0

    @property
    def message_type(self) -> str:
        return self.message.metadata.message_type if self.message is not None else ""

    @property
    def sha256(self) -> str:
        """The instruction's SHA-256 (hex), as its ledger entry records it."""
        assert self.digest is not None
        return self.digest.hexdigest()


class InstructionDigest:
    """SHA-256 of the instruction's bytes, started when it is admitted. A 45 MB model takes
    ~30 ms to hash; on a thread (hashlib releases the GIL) it is done while the ClientApp runs,
    instead of on the reply's path (`benchmarks/gate_cost.py`)."""

    THREAD_FROM = 1 << 20  # below this, hashing costs less than starting a thread

    def __init__(self, raw: bytes) -> None:
        self._hash = hashlib.sha256()
        self._thread: threading.Thread | None = None
        if len(raw) >= self.THREAD_FROM:
            self._thread = threading.Thread(target=self._hash.update, args=(raw,), name="fedgate-digest", daemon=True)
            self._thread.start()
        else:
            self._hash.update(raw)

    def hexdigest(self) -> str:
        thread = self._thread
        if thread is not None:
            thread.join()  # joining twice (two callers at once) is harmless
        return self._hash.hexdigest()


@dataclass(frozen=True)
class Outcome:
    """`wire` is what leaves when the reply is sent (issue 15: its exact bytes, encoded once;
    the ledger recorded a view of their content), else `built`, the refusal as a message.
    `wire` is a read-only view; the buffer behind it (`wire.obj`) is the gate's, and only
    trusted executor code holds it, to send it unchanged."""

    decision: GateDecision
    seq: int
    cumulative_bits: float
    release: Release
    wire: memoryview | bytes | None = None
    built: Message | None = None

    @cached_property
    def message(self) -> Message | None:
        """What is sent, as a Flower Message (read back from `wire` on first use); None only
        when the instruction's own bytes could not be read as one (the executor then sends
        its generic refusal)."""
        if self.built is None and self.wire is not None:
            return message_from_bytes(self.wire)
        return self.built

    @property
    def unsendable(self) -> bool:
        """True when there is nothing to send (the instruction was unreadable)."""
        return self.wire is None and self.built is None


class GatePipeline:
    """One hospital's gate. The only writer of its ledger; one reply at a time."""

    def __init__(
        self, policy: Policy, hospital_dir: Path, hospital: str, destination: str, *, images: ImageSource | None = None
    ) -> None:
        """`images`: the hospital's own images, for the `[audit]` stage (None: none configured;
        an audited reply is then refused if the policy refuses on the audit's word)."""
        self.policy = policy
        self.hospital_dir = Path(hospital_dir)
        self.hospital = hospital
        self.destination = destination
        self.images = images
        self._ledger: Ledger | None = None
        self._lock: IO[bytes] | None = None
        self._drawing: PredrawnNoise | None = None  # the latest reply's noise: one drawing at a time

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._lock = hold_gate_lock(self.hospital_dir)
            self._ledger = Ledger(self.hospital_dir / LEDGER_DIR)
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def state(self) -> GateState:
        return GateState.from_json(self.ledger.state())

    # -- before the ClientApp runs -------------------------------------------------------------

    def admit(
        self, raw: bytes, arrived: float | None = None, dp_sgd: DpSgdEvent | None = None, *, honest_in_sum: int = 1
    ) -> Admission:
        """Before any code runs. `dp_sgd`: the trusted trainer's planned DP-SGD event (the
        hospital's own code computed it from the recipe and its data); None for a gated reply.
        `honest_in_sum` (SecAgg+, `fedgate.secagg`): the update leaves only masked, inside a sum
        assumed to hold at least that many honestly noised replies: its bound and ε are the sum's."""
        arrived = time.time() if arrived is None else arrived
        state = self.state()
        refused_bound = Bound(timing_bits=self.policy.release.bits)  # a refusal still says "no", at some slot
        try:
            message = message_head(raw)  # issue 15: the metadata only, without copying the model
        except ValueError as err:
            return Admission(
                raw, None, arrived, state, refusal=GateRefusal("instruction", str(err)), bound=refused_bound
            )
        self._record_policy(message.metadata.run_id, state)
        state = self.state()
        try:
            instruction = decode_instruction(raw, self.policy.allowed_types)
        except GateRefusal as err:
            return Admission(raw, message, arrived, state, refusal=err, bound=refused_bound)
        except Exception as err:  # fail closed: an instruction the decoder chokes on is refused, on record
            refused = GateRefusal("instruction", f"{type(err).__name__}: {err}"[:500])
            return Admission(raw, message, arrived, state, refusal=refused, bound=refused_bound)
        stages: list[StageEvidence] = []
        gate_round = 0
        bound = refused_bound
        try:
            if state.halted:
                raise GateRefusal("halted", f"this hospital's gate is halted: {state.halt_reason}")
            if instruction.manifest is not None:
                stages.append(rules.check_model_approved(instruction, self.policy, state))
                gate_round = state.gate_round(instruction.manifest.hash)
            bound = self._bound(instruction, honest_in_sum)
            stages.append(rules.check_budget(state, self.policy, message.metadata.run_id, bound.total))
            history = accounting.PrivacyHistory.from_json(state.privacy_history)
            privacy = accounting.plan(self.policy, history, instruction.manifest, dp_sgd, honest_in_sum)
            noise = self._predraw(instruction)
        except GateRefusal as err:
            return Admission(raw, message, arrived, state, instruction, err, bound, gate_round, tuple(stages))
        except Exception as err:  # fail closed, as above
            refused = GateRefusal("gate-error", f"{type(err).__name__}: {err}"[:500])
            return Admission(raw, message, arrived, state, instruction, refused, bound, gate_round, tuple(stages))
        return Admission(raw, message, arrived, state, instruction, None, bound, gate_round, tuple(stages), privacy,
                         noise=noise)  # fmt: skip

    def _predraw(self, instruction: Instruction) -> PredrawnNoise | None:
        """Start drawing the noise of the reply to `instruction` (only a reply to an
        instruction with a model is noised: `_decide`)."""
        if instruction.manifest is None:
            return None
        if self._drawing is not None:  # a server sending faster than the noise is drawn waits for it:
            self._drawing.wait()  # threads and buffers never pile up (one in flight per gate)
        floats = instruction.manifest.float_coordinates
        self._drawing = PredrawnNoise(floats, self.policy.clip_norm, self.policy.sigma, NoiseSource.from_os_entropy())
        return self._drawing

    def _bound(self, instruction: Instruction, honest_in_sum: int = 1) -> Bound:
        """The bound a sent reply to this instruction has: fixed by the policy and the model's
        size before the ClientApp runs, so the budget is checked before it runs."""
        update = 0.0
        if instruction.manifest is not None:
            floats = instruction.manifest.float_coordinates
            update = rules.update_bits_for(self.policy.clip_norm, self.policy.sigma, floats, honest_in_sum)
        metrics = rules.canonical_metrics(None, instruction.category, self.policy).bits
        return Bound(update, metrics, 1.0, self.policy.release.bits)

    # -- after it ran ----------------------------------------------------------------------------

    def conclude(
        self, admission: Admission, outcome: AppOutcome | None, finalize: Finalize | None = None, review_note: str = ""
    ) -> Outcome:
        """`finalize` (secure aggregation) turns the checked content into what is sent (e.g. a
        masked vector) after every rule and the review, before the ledger records it;
        `review_note` says so, in words, on the review page (the reviewer sees the content
        before `finalize`)."""
        try:
            return self._conclude(admission, outcome, finalize, review_note)
        finally:
            if admission.noise is not None:
                admission.noise.discard()  # sent or refused, its noise goes with it

    def _conclude(
        self, admission: Admission, outcome: AppOutcome | None, finalize: Finalize | None, review_note: str
    ) -> Outcome:
        decision, checked = self._decide(admission, outcome)
        content: CheckedContent | RecordDict | None = checked
        release = schedule(self.policy.release, admission.arrived, time.time())
        if decision.sent and release.late:
            decision = _refused(decision, GateRefusal("release-late", "the reply was not ready by the last slot"))
            content = None
        if (
            content is not None
            and decision.sent
            and self.policy.review_required(admission.gate_round, decision.warnings)
        ):
            wait_until(release.at)  # the item appears at a slot boundary, not when the app finished
            decision, content = hold_for_review(self, admission, decision, _record_dict(content), review_note)
            release = after_review(self.policy.release, release, time.time())
        if finalize is not None and content is not None and decision.sent:
            try:
                content, decision = finalize(_record_dict(content), decision)
            except GateRefusal as err:  # fail closed, recorded under the rule that refused
                decision, content = _refused(decision, err), None
            except Exception as err:  # fail closed, recorded
                decision, content = _refused(decision, GateRefusal("finalize", f"{type(err).__name__}: {err}")), None
        return self._record_and_release(admission, outcome, decision, content, release)

    def _decide(self, admission: Admission, outcome: AppOutcome | None) -> tuple[GateDecision, CheckedContent | None]:
        instruction = admission.instruction
        category = instruction.category if instruction else ""
        stages = list(admission.stages)
        manifest = instruction.manifest.hash if instruction and instruction.manifest else ""
        try:
            if admission.refusal is not None:
                raise admission.refusal
            assert instruction is not None
            if outcome is None or outcome.reply is None:
                rule = outcome.rule if outcome is not None and outcome.rule else "client-error"
                raise GateRefusal(rule, outcome.error if outcome is not None else "the ClientApp did not run")
            reply = decode_reply(outcome.reply, instruction)
            warnings: list[str] = []
            model: OrderedDict[str, np.ndarray] | None = None
            laid = None
            if instruction.manifest is not None:
                stages += [rules.check_manifest(instruction, reply), rules.check_values(instruction, reply)]
                assert admission.message is not None  # the instruction was read
                laid = lay_out(instruction, message_headroom(make_reply(admission.message, admission.arrived,
                                                                        RecordDict(), None)))  # fmt: skip
                into = OrderedDict(zip(instruction.model, laid.arrays, strict=True)) if laid is not None else None
                source = admission.noise if admission.noise is not None else NoiseSource.from_os_entropy()
                model, update = rules.noise_update(instruction, reply, self.policy, source, into)
                stages.append(StageEvidence("update", True, update.evidence.to_json()))
                if update.evidence.clipped:
                    warnings.append("update-clipped")
            metrics = rules.canonical_metrics(reply, category, self.policy)
            stages.append(metrics.evidence)
            warnings += metrics.warnings
            if model is not None and category == "train" and self.policy.audit.audits(admission.gate_round):
                assert instruction.manifest is not None
                stages.append(
                    audit_stage(self.policy, instruction.manifest, instruction.model, model, update.evidence,
                                self.images, self.hospital_dir / AUDIT_DIR, _audit_name(admission))
                )  # fmt: skip
            content = CheckedContent(instruction.model_key, model, dict(metrics.values), laid)
            decision = GateDecision(True, category, tuple(stages), admission.bound, manifest, warnings=tuple(warnings))
            return decision, content
        except GateRefusal as err:
            base = GateDecision(True, category, tuple(stages), admission.bound, manifest)
            return _refused(base, err), None
        except Exception as err:  # fail closed: a reply the rules cannot read, or a bug here
            base = GateDecision(True, category, tuple(stages), admission.bound, manifest)
            return _refused(base, GateRefusal("gate-error", f"{type(err).__name__}: {err}")), None

    def _record_and_release(
        self,
        admission: Admission,
        outcome: AppOutcome | None,
        decision: GateDecision,
        content: CheckedContent | RecordDict | None,
        release: Release,
    ) -> Outcome:
        state = admission.state
        payloads: dict[str, bytes | memoryview] = {}
        sent: Message | None = None
        wire: memoryview | bytes | None = None
        if content is not None and decision.sent:
            # issue 15: the reply is encoded once (on the fast path the noise wrote the model
            # into these very bytes); the ledger records a view of its content's bytes
            assert admission.message is not None  # a sent decision had a readable instruction
            laid = wire_of(content, make_reply(admission.message, release.at, RecordDict(), None)) if isinstance(
                content, CheckedContent) else None  # fmt: skip
            if laid is None:
                sent = make_reply(admission.message, release.at, _record_dict(content), None)
                wire, span = encode_message(sent)
            else:
                wire, span = laid
            payloads["sent"] = memoryview(wire)[span]
        elif outcome is not None and outcome.reply is not None:
            payloads["refused"] = outcome.reply  # kept at the hospital, so it can see what was stopped
        instruction = admission.instruction
        manifest = instruction.manifest.hash if instruction and instruction.manifest else ""
        halt = ""
        if not decision.sent and self.policy.on_refusal == "halt" and decision.rule != "halted":
            halt = f"{decision.rule} at {release.at:.0f}: {decision.reason[:200]}"
        pin = manifest if decision.sent and manifest and not self.policy.approved_manifest else ""
        counted = decision.bound.total if decision.sent else decision.bound.refused().total
        spent = admission.privacy if decision.sent else None  # ε is spent by what leaves
        new_state = state.after(
            admission.run_id, counted, decision.sent, manifest, counts_round=bool(manifest), halt=halt, pin=pin,
            **(_privacy_state(state, spent) if spent is not None else {}),
        )  # fmt: skip
        fields = {
            "kind": KIND_SENT if decision.sent else KIND_REFUSED,
            "run_id": admission.run_id,
            "hospital": self.hospital,
            "destination": self.destination,
            "instruction": _instruction_fields(admission),
            "gate_round": admission.gate_round,
            "decision": decision.to_json(),
            "bits": decimal_str(counted),
            "cumulative_bits": decimal_str(new_state.cumulative_bits),
            "release": release.to_json(),
            "isolation": outcome.isolation if outcome is not None else {"mode": "none", "enforced": True},
            "executor": outcome.executor if outcome is not None else {},
            "policy_hash": self.policy.hash,
            "privacy": spent.to_json() if spent is not None else None,
        }
        # durable before anything moves on
        receipt = self.ledger.append(fields, payloads, state=new_state.to_json())
        wait_until(release.at)
        built: Message | None = sent
        if wire is None and admission.message is not None:
            built = refusal(admission.message, release.at, GENERIC_REFUSAL)
        if not decision.sent:
            log.warning("%s: refused a %s reply: %s", self.hospital, decision.message_type or "?", decision.reason)
        return Outcome(decision, receipt.seq, new_state.cumulative_bits, release, wire, built)

    def _record_policy(self, run_id: int, state: GateState) -> None:
        """The full policy goes into the ledger once per run (and again if it changed)."""
        if state.recorded_policies.get(str(run_id)) == self.policy.hash:
            return
        fields = {"kind": KIND_POLICY, "run_id": run_id, "hospital": self.hospital, "policy_hash": self.policy.hash}
        new_state = state.with_policy(run_id, self.policy.hash)
        self.ledger.append({**fields, "policy": self.policy.to_json()}, state=new_state.to_json())

    def record_review(self, fields: dict[str, Any], payloads: dict[str, bytes] | None = None) -> int:
        return self.ledger.append({**fields, "hospital": self.hospital}, payloads).seq


def _record_dict(content: CheckedContent | RecordDict) -> RecordDict:
    return content.record_dict() if isinstance(content, CheckedContent) else content


def _privacy_state(state: GateState, spent: accounting.PrivacyPlan) -> dict[str, Any]:
    """The gate state's privacy fields after `spent` was sent: the merged history, and the new
    cumulative figures as recorded (what `fedgate run`'s summary and the report read)."""
    history = accounting.PrivacyHistory.from_json(state.privacy_history).plus(spent.record, spent.hospital)
    modes = sorted({*state.privacy_last.get("modes", []), spent.mode})
    last = {
        "delta": repr(spent.delta),
        "record_level": spent.to_json()["record_level"]["cumulative"],
        "hospital_level": spent.to_json()["hospital_level"]["cumulative"],
        "modes": modes,
    }
    return {"privacy_history": history.to_json(), "privacy_last": last}


LOCK_FILE = ".gate.lock"


def hold_gate_lock(hospital_dir: Path) -> IO[bytes]:
    """One gate per hospital: its state is read, changed and written back by one process. A
    second gate (or `fedgate gate resume` while a node runs) is refused, not raced."""
    hospital_dir.mkdir(parents=True, exist_ok=True)
    handle = (hospital_dir / LOCK_FILE).open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        handle.close()
        raise LedgerError(
            f"another fedgate process holds the gate of {hospital_dir} (a node or a run): stop it first"
        ) from err
    return handle


def _refused(decision: GateDecision, err: GateRefusal) -> GateDecision:
    stage = StageEvidence(err.rule, False, rules.jsonable(err.detail))
    return replace(
        decision,
        sent=False,
        stages=(*decision.stages, stage),
        rule=err.rule,
        reason=str(err),
        detail=rules.jsonable(err.detail),
        warnings=(),
    )


def _audit_name(admission: Admission) -> str:
    """The kept audit pictures' file stem: the gate round and the instruction's hash."""
    return f"round-{admission.gate_round}-{admission.sha256[:16]}"


def _instruction_fields(admission: Admission) -> dict[str, Any]:
    message = admission.message
    instruction = admission.instruction
    server_round = instruction.server_round if instruction else ""
    return {
        "sha256": admission.sha256,
        "message_id": message.metadata.message_id if message else "",
        "message_type": message.metadata.message_type[:200] if message else "",
        "group_id": message.metadata.group_id[:200] if message else "",
        "server_round": server_round,
        "server_round_int": literal_round(server_round),
        "arrived": decimal_str(admission.arrived, 17),
    }


__all__ = ["GENERIC_REFUSAL", "KIND_REFUSED", "KIND_REVIEW", "KIND_REVIEW_HELD", "KIND_SENT", "Admission", "AppOutcome",
           "GatePipeline", "Outcome"]  # fmt: skip
