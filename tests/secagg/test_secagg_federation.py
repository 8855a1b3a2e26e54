"""SecAgg+ run by each hospital's gate, end to end in this process: fedgate's server workflow on
Flower's Grid, five hospitals with real gates and ledgers, the ClientApp in process."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.server.strategy.aggregate import aggregate
from inprocess import FIRST_NODE, HospitalGrid, distributed, federation
from secagg_apps import app, initial_model, run_server

import fedgate.secagg.handler as handler_module
from conftest import RUN_ID, instruction, policy_with
from fedgate.flower_adapter import SECAGG_CONFIGS, context_to_bytes, message_from_bytes, message_to_bytes
from fedgate.gate.decode import decode_record
from fedgate.gate.entries import OtherEntry, ReplyEntry, read_entries
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger
from fedgate.privacy import UpdateNoiseEvent, hospital_level
from fedgate.secagg import SecAggPolicy, masks
from fedgate.secagg.protocol import ClientSession
from fedgate.secagg.records import KIND_SECAGG_REFUSED, KIND_SECAGG_REPLY, masked_round, secagg_summary
from fedgate.secagg.workflow import SecAggRoundFailed

HOSPITALS = 5
SECAGG = SecAggPolicy(enabled=True, threshold=3, assumed_honest=3)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, dict[str, np.ndarray]]]:
    """What each gate released (after every rule, before the mask), by node id, for the last round."""
    released: dict[int, dict[str, np.ndarray]] = {}
    original = handler_module._mask

    def spy(session: Any, admission: Any, bound: Any, content: Any, decision: Any) -> Any:
        model = decode_record(content[admission.instruction.model_key])
        released[session.node_id] = {name: np.array(value) for name, value in model.items()}
        return original(session, admission, bound, content, decision)

    monkeypatch.setattr(handler_module, "_mask", spy)
    yield released


def run(
    tmp: Path, run_config: dict[str, Any] | None = None, drop: Any = None, rounds: int = 1
) -> tuple[list[np.ndarray], Any, HospitalGrid]:
    policy = distributed(policy_with(), SECAGG.assumed_honest)
    grid = federation(tmp, policy, SECAGG, app, HOSPITALS, RUN_ID, run_config or {}, drop)
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config or {})
    try:
        final, workflow = run_server(grid, context, rounds, num_shares=HOSPITALS, threshold=SECAGG.threshold)
    finally:
        grid.close()
    return final, workflow, grid


def fedavg_of(released: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Plain FedAvg (Flower's `aggregate`) of the gated replies, every hospital weighing the same."""
    return aggregate([([r[k] for k in sorted(r, key=int)], 1) for r in released])


def test_aggregate_is_fedavg_of_the_gated_replies(tmp_path: Path, captured: dict[int, dict[str, np.ndarray]]) -> None:
    final, workflow, _ = run(tmp_path)
    assert [{k: r[k] for k in ("round", "summed", "dropped")} for r in workflow.rounds] == [
        {"round": 1, "summed": list(range(FIRST_NODE, FIRST_NODE + 5)), "dropped": []}
    ]
    assert set(workflow.rounds[0]["seconds"]) == {"setup", "share keys", "collect masked vectors", "unmask"}
    expected = fedavg_of(list(captured.values()))
    assert len(captured) == HOSPITALS
    for got, want in zip(final[:2], expected[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # float32 rounding only: the sum is exact
    moved = np.abs(final[0] - initial_model()[0]).max()
    assert moved > 1e-3  # the model did change (the test would pass vacuously otherwise)


@pytest.mark.parametrize("failing", [[1], [1, 3]])
def test_hospitals_dropped_at_the_masked_stage_leave_the_survivors_sum(
    tmp_path: Path, captured: dict[int, dict[str, np.ndarray]], failing: list[int]
) -> None:
    config = {"fail-partitions": ",".join(map(str, failing))}
    final, workflow, _ = run(tmp_path, config)
    dropped = [FIRST_NODE + i for i in failing]
    assert workflow.rounds[0]["dropped"] == dropped
    assert len(captured) == HOSPITALS - len(failing)
    expected = fedavg_of(list(captured.values()))
    for got, want in zip(final[:2], expected[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    summary = secagg_summary([tmp_path / f"hospital-{i}" for i in range(HOSPITALS)], RUN_ID)
    assert summary == {"enabled": True, "num_shares": 5, "threshold": 3,
                       "dropped": [f"hospital-{i}" for i in failing]}  # fmt: skip


def test_hospitals_lost_after_sending_are_unmasked_from_their_shares(
    tmp_path: Path, captured: dict[int, dict[str, np.ndarray]]
) -> None:
    """Replies lost on the way (the gate sent its masked vector, the server never got it): the
    survivors' shares of the lost hospitals' first keys remove the pairwise masks."""
    lost = {FIRST_NODE + 0, FIRST_NODE + 4}
    final, workflow, _ = run(tmp_path, drop=lambda stage, node: stage == "collect_masked_vectors" and node in lost)
    assert workflow.rounds[0]["dropped"] == sorted(lost)
    survivors = [captured[node] for node in sorted(captured) if node not in lost]
    assert len(survivors) == 3
    for got, want in zip(final[:2], fedavg_of(survivors)[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_three_dropped_of_five_fails_the_round_loudly(tmp_path: Path) -> None:
    with pytest.raises(SecAggRoundFailed, match=r"round 1 failed at the collect masked vectors stage: 2 of 5"):
        run(tmp_path, {"fail-partitions": "0,2,4"})


def test_every_stage_reply_is_in_the_ledger_and_the_bound_is_for_the_sum(tmp_path: Path) -> None:
    run(tmp_path, rounds=2)
    policy = distributed(policy_with(), SECAGG.assumed_honest)
    for i in range(HOSPITALS):
        folder = tmp_path / f"hospital-{i}" / "ledger"
        verify_ledger(folder)
        with Ledger(folder, create=False) as ledger:
            entries = read_entries(ledger)
        stages = [e.fields["stage"] for e in entries if isinstance(e, OtherEntry) and e.kind == KIND_SECAGG_REPLY]
        assert stages == ["setup", "share_keys", "unmask"] * 2
        replies = [e for e in entries if isinstance(e, ReplyEntry)]
        assert [r.sent for r in replies] == [True, True]
        for reply in replies:
            evidence = masked_round(reply)
            assert evidence is not None and evidence["prg"].startswith("chacha20")
            bound = evidence["bound"]
            assert int(bound["assumed_honest"]) == 3 and "at least 3 hospitals" in bound["assumption"]
            # the sum's bound is the gated mode's at sigma = z C: 1 / (2 z^2 ln 2), plus the grid's 0.79 %
            gated = 1.0 / (2.0 * policy.noise_multiplier**2 * math.log(2.0))
            assert gated <= reply.update_bits <= gated * 1.008
            assert float(bound["reply_bits"]) == pytest.approx(3 * reply.update_bits, rel=1e-9)
            assert reply.metric_bits > 0  # train-loss and num-examples went in the clear, counted
            assert reply.bits == pytest.approx(reply.update_bits + reply.metric_bits + 1 + reply.timing_bits)
            # ε is the sum's too: the gated mode's ε at z (each hospital added z C / sqrt(3)), not that of
            # one reply at z / sqrt(3), which is what a server seeing the reply alone would get
            spent = float(reply.privacy["hospital_level"]["round"]["epsilon"])
            z_sum = 1.0 / math.sqrt(2.0 * reply.update_bits * math.log(2.0))
            assert z_sum == pytest.approx(policy.noise_multiplier, rel=0.005)
            assert spent == pytest.approx(hospital_level([UpdateNoiseEvent(z_sum)], 1e-5).epsilon, rel=1e-9)
            alone = hospital_level([UpdateNoiseEvent(z_sum / math.sqrt(3))], 1e-5).epsilon
            assert spent < alone / 1.5


def _masked_vectors(grid: HospitalGrid) -> dict[int, np.ndarray]:
    """What the ServerApp received from each hospital at the collect stage."""
    out: dict[int, np.ndarray] = {}
    for stage, node, _, reply in grid.traffic:
        if stage == "collect_masked_vectors":
            record = message_from_bytes(reply).content[SECAGG_CONFIGS]
            out[node] = np.frombuffer(record["masked_params"][0], dtype="<u8")  # type: ignore[index]
    return out


def _correlation(masked: np.ndarray, update: np.ndarray) -> float:
    received = masked.view(np.int64).astype(np.float64)  # as a server would read an unmasked vector
    return float(np.corrcoef(received, update)[0, 1])


def test_what_the_server_receives_is_independent_of_the_update(
    tmp_path: Path, captured: dict[int, dict[str, np.ndarray]]
) -> None:
    """Over 10,100 coordinates the masked vector's correlation with the hospital's released update
    is at noise level (|r| < 4/sqrt(n)); the same measurement on the unmasked vector is near 1
    (test_without_masks_the_server_would_read_the_update)."""
    _, _, grid = run(tmp_path)
    start = initial_model()
    for node, masked in _masked_vectors(grid).items():
        update = np.concatenate([(captured[node][k].astype(np.float64) - start[i]).ravel() for i, k in enumerate("01")])
        assert abs(_correlation(masked, update)) < 4 / math.sqrt(update.size), node


def test_without_masks_the_server_would_read_the_update(
    tmp_path: Path, captured: dict[int, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measurement above can see an update: with the masks replaced by zeros, r > 0.5."""
    monkeypatch.setattr(masks, "private_mask", lambda seed, n: np.zeros(n, dtype=np.uint64))
    monkeypatch.setattr(masks, "pairwise_mask", lambda key, n: np.zeros(n, dtype=np.uint64))
    _, _, grid = run(tmp_path)
    start = initial_model()
    for node, masked in _masked_vectors(grid).items():
        update = np.concatenate([(captured[node][k].astype(np.float64) - start[i]).ravel() for i, k in enumerate("01")])
        assert _correlation(masked, update) > 0.5


def test_no_key_material_in_anything_the_client_app_saw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets: list[bytes] = []
    original = ClientSession.mask

    def spy(self: ClientSession, vector: np.ndarray) -> np.ndarray:
        secrets.extend(self._secrets_for_tests())  # every secret of the round, just before it is used
        return original(self, vector)

    monkeypatch.setattr(ClientSession, "mask", spy)
    _, _, grid = run(tmp_path, rounds=2)
    exchanged: list[bytes] = []  # public keys, encrypted shares, shares: all the protocol's key material in transit
    for _, _, sent, reply in grid.traffic:
        for raw in (sent, reply):
            message = message_from_bytes(raw)
            record = message.content.get(SECAGG_CONFIGS) if message.has_content() else None
            for value in (record or {}).values():
                items = value if isinstance(value, list) else [value]
                exchanged += [v for v in items if isinstance(v, bytes) and len(v) >= 32]
    assert len(secrets) >= HOSPITALS * 2 * 8 and len(exchanged) > 100
    seen = [blob for hospital in grid.hospitals.values() for pair in hospital.seen for blob in pair]  # type: ignore[attr-defined]
    assert len(seen) == HOSPITALS * 2 * 2  # instruction and context, 2 rounds, 5 hospitals
    for blob in seen:
        assert b"secaggplus" not in blob
        for material in [*secrets, *exchanged]:
            assert material not in blob


def test_a_plain_train_instruction_is_refused_while_secagg_is_required(tmp_path: Path) -> None:
    policy = distributed(policy_with(), 3)
    grid = federation(tmp_path, policy, SECAGG, app, 1, RUN_ID, {})
    try:
        hospital = grid.hospitals[FIRST_NODE]
        raw = message_to_bytes(instruction())
        outgoing, _ = hospital.run_task(raw, context_to_bytes(Context(RUN_ID, FIRST_NODE, {}, RecordDict(), {})))
        assert message_from_bytes(outgoing).has_error()
        assert hospital.seen == []  # the ClientApp never ran
    finally:
        grid.close()
    with Ledger(tmp_path / "hospital-0" / "ledger", create=False) as ledger:
        replies = [e for e in read_entries(ledger) if isinstance(e, ReplyEntry)]
    assert [(r.sent, r.rule) for r in replies] == [(False, "secagg-required")]


def test_a_stock_flower_secagg_workflow_is_refused_at_setup(tmp_path: Path) -> None:
    """Stock Flower's workflow masks with MT19937 from a 32-bit seed: the gates do not take part
    (and Flower's workflow then stops the round with a log line only: fedgate's raises)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    policy = distributed(policy_with(), 3)
    grid = federation(tmp_path, policy, SECAGG, app, HOSPITALS, RUN_ID, {})
    strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=5, min_available_clients=5,
                      initial_parameters=ndarrays_to_parameters(initial_model()))  # fmt: skip
    context = LegacyContext(
        Context(RUN_ID, 0, {}, RecordDict(), {}), config=ServerConfig(num_rounds=1), strategy=strategy
    )
    try:
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(5, 3))(grid, context)
    finally:
        grid.close()
    assert [stage for stage, *_ in grid.traffic] == ["setup"] * HOSPITALS
    for i in range(HOSPITALS):
        with Ledger(tmp_path / f"hospital-{i}" / "ledger", create=False) as ledger:
            refused = [e for e in read_entries(ledger) if isinstance(e, OtherEntry) and e.kind == KIND_SECAGG_REFUSED]
        assert [(e.fields["stage"], e.fields["rule"]) for e in refused] == [("setup", "secagg-protocol")]
        assert "MT19937" in refused[0].fields["reason"]


def test_num_examples_and_metrics_in_the_clear_are_the_gate_s_quantised_values(tmp_path: Path) -> None:
    """Flower's protocol sends num_examples and metrics in the clear: what leaves is the gate's
    canonical values (bucketed to the policy's step, quantised), never the ClientApp's."""
    _, _, grid = run(tmp_path)
    replies = [message_from_bytes(reply) for stage, _, _, reply in grid.traffic if stage == "collect_masked_vectors"]
    assert len(replies) == HOSPITALS
    for reply in replies:
        examples = int(reply.content["fitres.num_examples"]["num_examples"])  # type: ignore[arg-type]
        metrics = dict(reply.content["fitres.metrics"])  # type: ignore[call-overload]
        assert examples % 100 == 0  # the app reported 100 (p + 1) + 7
        assert set(metrics) == {"train-loss"} and round(float(metrics["train-loss"]) / 0.01, 6).is_integer()
        assert dict(reply.content["fitres.status"]) == {"code": 0, "message": ""}  # type: ignore[call-overload]
        assert len(reply.content["fitres.parameters"]) == 0  # type: ignore[arg-type]
