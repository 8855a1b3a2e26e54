"""The gate's ε accounting: every sent reply records its round's and the cumulative ε (per
patient and for the hospital) from the gate's own noise or the hospital's planned DP-SGD; a
`[privacy] max_epsilon` refuses, before any code runs, the round that would pass it, across
runs and restarts; refused replies spend nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import Message

from conftest import gate_for, instruction, through_gate
from fedgate.flower_adapter import message_to_bytes
from fedgate.gate.accounting import gate_noise_multiplier
from fedgate.gate.decode import decode_instruction
from fedgate.gate.entries import ReplyEntry, read_entries
from fedgate.policy.model import PrivacyPolicy
from fedgate.privacy import DpSgdEvent, UpdateNoiseEvent, hospital_level, record_level
from malicious_apps import ATTACKS, honest


def replies(gate_dir: Path) -> list[ReplyEntry]:
    from fedgate.ledger.store import Ledger

    with Ledger(gate_dir / "ledger", create=False) as ledger:
        return [e for e in read_entries(ledger) if isinstance(e, ReplyEntry)]


def z_of(gate_folder: Path) -> float:
    gate = gate_for(gate_folder, noise_multiplier=1.0)
    manifest = decode_instruction(message_to_bytes(instruction()), ("train", "evaluate")).manifest
    assert manifest is not None
    return gate_noise_multiplier(gate.policy, manifest)


def test_each_sent_reply_records_the_round_and_the_cumulative_epsilon(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, noise_multiplier=1.0)
    for _ in range(3):
        assert through_gate(gate, instruction(), honest).decision.sent
    assert not through_gate(gate, instruction("evaluate"), honest).message.has_error()  # type: ignore[union-attr]
    sent = replies(tmp_path / "hospital-0")
    z = z_of(tmp_path / "z")
    assert 0.99 < z < 1.0  # σ = C, over the effective norm (C plus the grid's rounding)
    for k, entry in enumerate(sent[:3], start=1):
        privacy = entry.privacy
        assert privacy["mode"] == "gated" and privacy["delta"] == "1e-05"
        hospital = float(privacy["hospital_level"]["cumulative"]["epsilon"])
        per_patient = float(privacy["record_level"]["cumulative"]["epsilon"])
        assert hospital == pytest.approx(hospital_level([UpdateNoiseEvent(z, k)], 1e-5).epsilon, rel=1e-12)
        # a gated reply counts per patient at sensitivity 2C: the app may put one patient anywhere in the ball
        assert per_patient == pytest.approx(record_level([UpdateNoiseEvent(z, k)], 1e-5).epsilon, rel=1e-12)
        assert per_patient > hospital
        assert privacy["hospital_level"]["cumulative"]["accountant"] == "gaussian"
    assert sent[3].category == "evaluate" and sent[3].privacy == {}  # metrics only: bits, not ε


def test_a_refused_reply_spends_no_epsilon(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, noise_multiplier=1.0)
    through_gate(gate, instruction(), honest)
    before = gate.state().privacy_last
    refused = through_gate(gate, instruction(), ATTACKS["config-record"])
    assert not refused.decision.sent
    assert gate.state().privacy_last == before
    assert replies(tmp_path / "hospital-0")[-1].privacy == {}


def test_the_budget_refuses_the_round_that_would_pass_it_across_runs_and_restarts(tmp_path: Path) -> None:
    """Two replies fit under max_epsilon, the third would not: refused before the app runs,
    even in a new run of a restarted gate; the refusal is recorded, the server sees the generic error."""
    z = z_of(tmp_path / "z")
    two, three = (record_level([UpdateNoiseEvent(z, k)], 1e-5).epsilon for k in (2, 3))
    privacy = PrivacyPolicy(delta=1e-5, max_epsilon=(two + three) / 2, level="record")
    first = gate_for(tmp_path, noise_multiplier=1.0, privacy=privacy)
    for _ in range(2):
        assert through_gate(first, instruction(run_id=1), honest).decision.sent
    first.close()
    ran: list[bool] = []

    def app(msg: Message) -> Message:
        ran.append(True)
        return honest(msg)

    second = gate_for(tmp_path, noise_multiplier=1.0, privacy=privacy)  # a new process, a new run id
    out = through_gate(second, instruction(run_id=2), app)
    assert not ran and not out.decision.sent and out.decision.rule == "privacy.max_epsilon"
    assert out.message is not None and out.message.has_error()
    assert "per patient" in out.decision.reason
    # evaluate replies release no update, so no ε: they still go through
    assert not through_gate(second, instruction("evaluate", run_id=2), honest).message.has_error()  # type: ignore[union-attr]
    cumulative = float(second.state().privacy_last["record_level"]["epsilon"])
    assert cumulative == pytest.approx(two, rel=1e-12) and cumulative <= privacy.max_epsilon  # type: ignore[operator]


def test_a_trusted_reply_counts_its_planned_dp_sgd_per_patient(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, noise_multiplier=1.0)
    planned = DpSgdEvent(sample_rate=32 / 480, noise_multiplier=1.0, steps=30)
    raw = message_to_bytes(instruction())
    admission = gate.admit(raw, dp_sgd=planned)
    assert admission.privacy is not None and admission.privacy.mode == "trusted"
    from fedgate.flower_adapter import message_from_bytes
    from fedgate.gate.pipeline import AppOutcome

    out = gate.conclude(admission, AppOutcome(message_to_bytes(honest(message_from_bytes(raw)))))
    assert out.decision.sent
    privacy = replies(tmp_path / "hospital-0")[-1].privacy
    assert privacy["mode"] == "trusted"
    assert privacy["record_level"]["events"] == [planned.to_json()]
    assert float(privacy["record_level"]["cumulative"]["epsilon"]) == pytest.approx(
        record_level([planned], 1e-5).epsilon, rel=1e-12
    )
    assert privacy["record_level"]["cumulative"]["accountant"] == "pld"
    assert gate.state().privacy_last["modes"] == ["trusted"]


def test_no_gate_noise_is_no_guarantee(tmp_path: Path) -> None:
    gate = gate_for(tmp_path, noise_multiplier=0.0)
    assert through_gate(gate, instruction(), honest).decision.sent
    assert math.isinf(float(gate.state().privacy_last["hospital_level"]["epsilon"]))


def test_an_epsilon_the_client_app_reports_is_a_claim_never_the_enforced_figure(tmp_path: Path) -> None:
    """A policy may let a ClientApp's own `epsilon` metric leave (quantised, counted); the summary
    and the report show it as claimed, beside the ε the gate enforced, and never in its place."""
    from flwr.app import MetricRecord, RecordDict

    from fedgate.executor.summary import build_summary
    from fedgate.policy.model import MetricRule
    from fedgate.report.facts import read_facts
    from fedgate.report.render import render_facts

    gate = gate_for(tmp_path, noise_multiplier=1.0)
    rules = dict(gate.policy.metrics)
    rules["epsilon"] = MetricRule(step=0.1, min=0.0, max=100.0, types=("train",))
    gate = gate_for(tmp_path, noise_multiplier=1.0, metrics=tuple(sorted(rules.items())))

    def claims_privacy(ins: Message) -> Message:
        reply = honest(ins)
        records = dict(reply.content.items())
        records["metrics"] = MetricRecord({"train-loss": 0.4, "num-examples": 123, "epsilon": 0.5})
        return Message(RecordDict(records), reply_to=ins)  # type: ignore[arg-type]

    assert through_gate(gate, instruction(), claims_privacy).decision.sent
    gate.close()
    [entry] = replies(tmp_path / "hospital-0")
    summary = build_summary(entry.run_id, 1, 1, 1.0, [], [tmp_path / "hospital-0"], "hash")
    enforced = summary["epsilon"]["hospital-0"]["record_level"]
    assert summary["epsilon_claimed"] == {"hospital-0": {"epsilon": "0.5"}}
    assert enforced is not None and enforced > 1  # the gate's own figure, not the app's 0.5
    facts = read_facts(tmp_path / "hospital-0")
    assert facts.privacy is not None and facts.privacy.claimed == {"epsilon": "0.5"}
    assert facts.privacy.record_level == pytest.approx(enforced)
    assert "Claimed, not enforced" in render_facts(facts)
