"""The seam: admission before any code runs, rules, a durable record of the exact bytes with the
gate's state in the same transaction, and a message built only from the instruction and the
gate's own values, released at a slot the gate sets."""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MetricRecord

from conftest import RUN_ID, gate_for, instruction, through_gate
from fedgate.errors import LedgerError
from fedgate.flower_adapter import message_to_bytes, metadata_fields, recorddict_to_bytes
from fedgate.gate.pipeline import GENERIC_REFUSAL, KIND_REFUSED
from fedgate.gate.release import after_review, schedule
from fedgate.ledger.verify import verify_ledger
from fedgate.policy.model import ReleasePolicy
from malicious_apps import ATTACKS, CANARY, CANARY_TEXT, honest


def test_sent_reply_is_recorded_byte_for_byte_before_it_is_returned(tmp_path: Path) -> None:
    gate = gate_for(tmp_path)
    ins = instruction()
    out = through_gate(gate, ins, honest)
    assert out.decision.sent and out.message is not None and not out.message.has_error()
    assert out.message.metadata.reply_to_message_id == ins.metadata.message_id
    entry = gate.ledger.entries()[out.seq]
    assert entry["kind"] == "reply-sent" and entry["hospital"] == "hospital-0" and entry["gate_round"] == 1
    stored = gate.ledger.blobs.get(entry["payloads"]["sent"]["sha256"])
    assert stored == recorddict_to_bytes(out.message.content)
    assert entry["policy_hash"] == gate.policy.hash
    assert entry["instruction"]["group_id"] == ins.metadata.group_id
    gate.close()
    assert [e["kind"] for e in gate.ledger.entries()] == ["policy", "reply-sent"]
    assert verify_ledger(tmp_path / "hospital-0" / "ledger").entries == 2


@pytest.mark.parametrize("attack", ["config-record", "raises", "metric-string", "metrics-renamed"])
def test_refusal_sends_only_a_generic_error_and_keeps_the_evidence(tmp_path: Path, attack: str) -> None:
    gate = gate_for(tmp_path)
    out = through_gate(gate, instruction(), ATTACKS[attack])
    assert out.message is not None and out.message.has_error()
    assert out.message.error.reason == GENERIC_REFUSAL and not out.message.has_content()
    entry = gate.ledger.entries()[out.seq]
    assert entry["kind"] == "reply-refused" and entry["decision"]["rule"] == out.decision.rule
    if "refused" in entry["payloads"]:  # what was stopped is kept locally for inspection
        assert CANARY in gate.ledger.blobs.get(entry["payloads"]["refused"]["sha256"])
    else:
        assert CANARY_TEXT in entry["decision"]["reason"]


def test_outgoing_metadata_is_built_from_the_instruction_only(tmp_path: Path) -> None:
    """group_id, message_type, task ids, ttl and created_at of a reply are the gate's: a
    ClientApp that writes into its reply's metadata changes nothing that leaves."""
    ins = instruction()
    honest_out = through_gate(gate_for(tmp_path / "a"), ins, honest)

    def loud_metadata(msg: Message) -> Message:
        reply = honest(msg)
        for key, value in {"_group_id": CANARY_TEXT * 1000, "_ttl": 1234.5678, "_src_task_id": 2**62,
                           "_created_at": 1.0, "_message_type": "train.x" + CANARY.hex()}.items():  # fmt: skip
            reply.metadata.__dict__[key] = value
        return reply

    loud_out = through_gate(gate_for(tmp_path / "b"), ins, loud_metadata)
    assert loud_out.decision.rule == "reply-mismatch"  # its message type no longer matches
    assert loud_out.message is not None
    fields = metadata_fields(loud_out.message)
    assert CANARY_TEXT not in str(fields) and CANARY.hex() not in str(fields)
    assert honest_out.message is not None
    for name in ("group_id", "message_type", "run_id", "src_task_id", "dst_task_id", "reply_to_message_id"):
        assert fields[name] == metadata_fields(honest_out.message)[name]
    assert fields["created_at"] == pytest.approx(loud_out.release.at)


def test_gate_state_survives_a_restart_and_a_new_run_id(tmp_path: Path) -> None:
    first = through_gate(gate_for(tmp_path), instruction(), honest)
    again = gate_for(tmp_path)  # a new process after a crash: only the ledger remembers
    second = through_gate(again, instruction(server_round=99, run_id=RUN_ID + 1), honest)
    assert second.cumulative_bits == pytest.approx(2 * first.decision.bound.total)
    assert again.ledger.entries()[second.seq]["gate_round"] == 2  # the gate's count, not the server's 99
    other_model = instruction(tensors={"w": np.zeros(3, dtype=np.float32)}, run_id=RUN_ID + 2)
    assert through_gate(again, other_model, honest).decision.rule == "manifest-not-approved"


def test_budget_spans_runs_and_counts_refusals(tmp_path: Path) -> None:
    probe = through_gate(gate_for(tmp_path / "probe", noise_multiplier=0.1), instruction(), honest)
    per_reply = probe.decision.bound.total
    gate = gate_for(tmp_path, noise_multiplier=0.1, max_total_bits=2.5 * per_reply)
    assert through_gate(gate, instruction(run_id=1), honest).decision.sent
    assert through_gate(gate, instruction(run_id=2), honest).decision.sent  # a new run, same budget
    refused = through_gate(gate, instruction(run_id=3), honest)
    assert refused.decision.rule == "budget"
    # the refusal itself still said "no" at some slot: counted
    assert refused.cumulative_bits == pytest.approx(2 * per_reply + probe.decision.bound.refused().total)


def test_budget_per_run_when_the_policy_says_so(tmp_path: Path) -> None:
    probe = through_gate(gate_for(tmp_path / "probe", noise_multiplier=0.1), instruction(), honest)
    gate = gate_for(tmp_path, noise_multiplier=0.1, max_total_bits=1.5 * probe.decision.bound.total, budget_scope="run")
    assert through_gate(gate, instruction(run_id=1), honest).decision.sent
    assert through_gate(gate, instruction(run_id=1), honest).decision.rule == "budget"
    assert through_gate(gate, instruction(run_id=2), honest).decision.sent


def test_halt_spans_runs_and_restarts_and_no_code_runs(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, on_refusal="halt")
    assert through_gate(gate, instruction(run_id=1), ATTACKS["nan"]).decision.rule == "non-finite"
    ran: list[int] = []

    def app(msg: Message) -> Message:
        ran.append(1)
        return honest(msg)

    gate.close()  # the process ends (a crash releases its lock the same way)
    restarted = gate_for(tmp_path, on_refusal="halt")
    for run_id in (1, 2, 3):
        assert through_gate(restarted, instruction(run_id=run_id), app).decision.rule == "halted"
    assert ran == []


def test_unwritable_ledger_means_nothing_is_sent(tmp_path: Path) -> None:
    gate = gate_for(tmp_path)
    through_gate(gate, instruction(), honest)
    gate.ledger.db.execute("PRAGMA query_only = ON")  # appends now fail
    with pytest.raises(LedgerError):
        through_gate(gate, instruction(), honest)


def test_one_gate_per_hospital(tmp_path: Path) -> None:
    first = gate_for(tmp_path)
    through_gate(first, instruction(), honest)
    with pytest.raises(LedgerError, match="holds the gate"):
        through_gate(gate_for(tmp_path), instruction(), honest)
    first.close()
    assert through_gate(gate_for(tmp_path), instruction(), honest).decision.sent


def test_edited_gate_state_stops_the_gate(tmp_path: Path) -> None:
    """The budget cannot be reset by editing the state in the ledger's database."""
    gate = gate_for(tmp_path)
    through_gate(gate, instruction(), honest)
    gate.ledger.db.execute("UPDATE tip SET state = ?", (b'{"schema":1}',))
    with pytest.raises(LedgerError):
        through_gate(gate, instruction(), honest)


# -- timing ------------------------------------------------------------------------------------


def test_release_time_is_a_slot_boundary_not_the_apps_compute_time() -> None:
    policy = ReleasePolicy(slot_s=1.0, max_slots=8)
    arrived = 1000.0
    for ready in (1000.01, 1000.5, 1000.99):
        assert schedule(policy, arrived, ready).at == 1001.0
    assert schedule(policy, arrived, 1002.3).at == 1003.0
    late = schedule(policy, arrived, 1010.0)
    assert late.late and late.at == 1016.0  # a fixed time, not when the late answer came
    assert schedule(policy, arrived, 1013.7).at == 1016.0


def test_a_reviewed_reply_leaves_on_the_grid_after_the_decision() -> None:
    policy = ReleasePolicy(slot_s=1.0, max_slots=8)
    first = schedule(policy, 1000.0, 1000.3)
    assert after_review(policy, first, 1000.7).at == 1001.0  # decided within the app's slot
    assert after_review(policy, first, 1042.2).at == 1043.0  # a long review: the next slot, not a late refusal
    assert not after_review(policy, first, 1042.2).late


def test_compute_time_inside_a_slot_does_not_move_the_release(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, release=ReleasePolicy(slot_s=0.4, max_slots=16))
    offsets = []
    for delay in (0.0, 0.25):

        def slow(msg: Message, delay: float = delay) -> Message:
            time.sleep(delay)
            return honest(msg)

        out = through_gate(gate, instruction(), slow)
        assert out.message is not None
        offsets.append(round(out.message.metadata.created_at - out.release.arrived, 6))
    assert offsets == [0.4, 0.4]


def test_a_reply_not_ready_by_the_last_slot_is_refused(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, release=ReleasePolicy(slot_s=0.05, max_slots=2))

    def slow(msg: Message) -> Message:
        time.sleep(0.2)
        return honest(msg)

    out = through_gate(gate, instruction(), slow)
    assert out.decision.rule == "release-late"


def test_every_reply_counts_its_timing_bits(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, release=ReleasePolicy(slot_s=0.01, max_slots=64))
    out = through_gate(gate, instruction(), ATTACKS["config-record"])
    assert out.decision.bound.refused().total == pytest.approx(1 + math.log2(65))
    assert out.cumulative_bits == pytest.approx(1 + math.log2(65))


# -- the reply is a fresh object --------------------------------------------------------------


def test_bytes_written_into_the_reply_after_the_gate_do_not_leave(tmp_path: Path) -> None:
    """The outgoing message is built from the gate's own arrays; nothing the app returned is
    forwarded as an object."""
    gate = gate_for(tmp_path)
    captured: list[Message] = []

    def keeps_a_handle(msg: Message) -> Message:
        reply = honest(msg)
        captured.append(reply)
        return reply

    out = through_gate(gate, instruction(), keeps_a_handle)
    captured[0].content["metrics"] = MetricRecord({"train-loss": 9.99})
    assert out.message is not None and dict(out.message.content["metrics"])["train-loss"] != pytest.approx(9.99)


def test_entry_records_isolation_and_instruction_digest(tmp_path: Path) -> None:
    from conftest import policy_with
    from fedgate.flower_adapter import message_to_bytes
    from fedgate.gate.pipeline import AppOutcome, GatePipeline

    gate = GatePipeline(policy_with(), tmp_path / "h", "h", "test://")
    ins = instruction()
    raw = message_to_bytes(ins)
    admission = gate.admit(raw)
    isolation = {"mode": "sandbox", "enforced": True, "layers": []}
    out = gate.conclude(admission, AppOutcome(message_to_bytes(honest(ins)), isolation=isolation))
    entry = gate.ledger.entries()[out.seq]
    assert entry["isolation"] == isolation
    assert entry["instruction"]["sha256"] == hashlib.sha256(raw).hexdigest()


def test_a_halt_is_lifted_only_by_an_operator_and_that_is_on_record(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedgate.cli.main import app

    gate = gate_for(tmp_path, on_refusal="halt")
    through_gate(gate, instruction(), ATTACKS["nan"])
    folder = str(tmp_path / "hospital-0")
    runner = CliRunner()
    busy = runner.invoke(app, ["gate", "resume", folder, "--operator", "IT", "--reason", "fixed"])
    assert busy.exit_code != 0  # the gate is held by a running process
    gate.close()
    assert "halted" in runner.invoke(app, ["gate", "status", folder]).output
    result = runner.invoke(app, ["gate", "resume", folder, "--operator", "Dr IT", "--reason", "bug fixed"])
    assert result.exit_code == 0, result.output
    restarted = gate_for(tmp_path, on_refusal="halt")
    assert through_gate(restarted, instruction(), honest).decision.sent
    kinds = [e["kind"] for e in restarted.ledger.entries()]
    assert "gate-resumed" in kinds and restarted.ledger.entries()[kinds.index("gate-resumed")]["operator"] == "Dr IT"
    assert verify_ledger(tmp_path / "hospital-0" / "ledger").entries == len(kinds)


def test_the_state_keeps_a_bounded_number_of_server_chosen_run_ids() -> None:
    from fedgate.gate.state import RUNS_KEPT, GateState

    state = GateState()
    for run_id in range(RUNS_KEPT + 50):
        state = GateState.from_json(state.with_policy(run_id, "p").after(run_id, 1.0, True, "m", True).to_json())
    assert len(state.run_bits) == len(state.recorded_policies) == RUNS_KEPT
    assert list(state.run_bits)[-1] == str(RUNS_KEPT + 49)  # the latest kept, the oldest dropped
    assert state.cumulative_bits == RUNS_KEPT + 50  # the hospital-wide total never forgets


@pytest.mark.parametrize("stage", ["decode_instruction", "check_budget"])
def test_an_exception_at_admission_is_a_recorded_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Any exception while reading or checking the instruction (not only a GateRefusal) ends in
    a refusal on record and a generic error: the gate fails closed, and never runs the app."""
    import fedgate.gate.pipeline as pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an unforeseen instruction")

    if stage == "decode_instruction":
        monkeypatch.setattr(pipeline, "decode_instruction", broken)
    else:
        monkeypatch.setattr(pipeline.rules, "check_budget", broken)
    gate = gate_for(tmp_path)
    ran: list[bool] = []

    def app(msg: Message) -> Message:
        ran.append(True)
        return honest(msg)

    out = through_gate(gate, instruction(), app)
    assert not ran and not out.decision.sent
    assert out.message is not None and out.message.error.reason == GENERIC_REFUSAL
    entry = gate.ledger.entries()[out.seq]
    assert entry["kind"] == "reply-refused" and "unforeseen" in entry["decision"]["reason"]


def test_noise_that_could_not_be_drawn_is_a_recorded_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise is drawn from admission on, on a thread (issue 15): if that fails, the reply
    is refused on record with the generic error, never sent without its noise."""
    from fedgate.gate.noise import NoiseSource

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("no entropy")

    monkeypatch.setattr(NoiseSource, "integer_gaussian", broken)
    gate = gate_for(tmp_path)
    out = through_gate(gate, instruction(), honest)
    assert not out.decision.sent and out.decision.rule == "gate-error" and "no entropy" in out.decision.reason
    assert out.wire is None and out.message is not None and out.message.error.reason == GENERIC_REFUSAL
    assert gate.ledger.entries()[out.seq]["kind"] == KIND_REFUSED
    gate.close()


def test_a_model_record_named_like_the_metrics_is_refused_before_any_code_runs(tmp_path: Path) -> None:
    """Red team (issue 15): a server naming its model record "metrics" made the reply carry
    two records of that name (the shipped bytes, the ledger and Flower's reading of them
    disagreed) or lose the model on the review path. It is refused at admission."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedgate.flower_adapter import make_instruction
    from fedgate.gate.decode import METRICS_KEY
    from model_fixtures import tiny_model

    records = {"config": ConfigRecord({"server-round": 1}),
               METRICS_KEY: ArrayRecord({n: Array(v) for n, v in tiny_model().items()})}  # fmt: skip
    ins = make_instruction(RecordDict(records), "train", dst_node_id=1, run_id=RUN_ID)  # type: ignore[arg-type]
    gate = gate_for(tmp_path)
    admission = gate.admit(message_to_bytes(ins))
    assert admission.refusal is not None and admission.refusal.rule == "instruction"
    assert METRICS_KEY in str(admission.refusal) and admission.noise is None  # no noise drawn for it
    out = gate.conclude(admission, None)
    assert not out.decision.sent and out.wire is None
    # the control: the same model under another record name is admitted, noised and sent
    records["arrays"] = records.pop(METRICS_KEY)
    honest_ins = make_instruction(RecordDict(records), "train", dst_node_id=1, run_id=RUN_ID)  # type: ignore[arg-type]
    assert through_gate(gate, honest_ins, honest).decision.sent
    gate.close()


def test_noise_drawings_never_pile_up_when_replies_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team (issue 15): each admission draws its reply's noise on threads; a hostile server
    sending instructions whose replies are refused started one drawing (and one buffer of a
    float64 per coordinate) per instruction. Now one at a time per gate, and a concluded
    reply's draws are dropped, sent or refused."""
    from fedgate.gate.noise import NoiseSource
    from fedgate.gate.pipeline import AppOutcome
    from fedgate.gate.update import PredrawnNoise

    draw = NoiseSource.integer_gaussian

    def slow(self: NoiseSource, *args: object) -> None:
        time.sleep(0.02)  # a drawing that outlasts the next admission, as a 45 MB model's does
        draw(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(NoiseSource, "integer_gaussian", slow)
    gate = gate_for(tmp_path, max_total_bits=0.0)
    raw = message_to_bytes(instruction(tensors={"w": np.zeros(300_000, np.float32)}))
    drawings: list[PredrawnNoise] = []
    for _ in range(4):
        admission = gate.admit(raw)
        assert admission.refusal is None and admission.noise is not None
        assert not any(d._thread.is_alive() for d in drawings)  # the previous drawing ended before this one
        drawings.append(admission.noise)
        gate.conclude(admission, AppOutcome(None, "the app raised", "client-error"))
        assert admission.noise._draws is None  # refused: its noise is dropped
    gate.close()
