"""The accountant against dp-accounting's published examples, Opacus, and the platform notes."""

from __future__ import annotations

import json
import math

import pytest

from fedgate.privacy import (
    DpSgdEvent,
    PrivacyError,
    UpdateNoiseEvent,
    calibrate_noise_multiplier,
    event_from_json,
    hospital_level,
    merge,
    record_level,
)


def dp_sgd_rounds(n: int, batch: int = 32, epochs: int = 2, rounds: int = 12, z: float = 1.0) -> list[DpSgdEvent]:
    """One event per round, as a hospital's ledger records them."""
    return [DpSgdEvent(batch / n, z, epochs * math.ceil(n / batch))] * rounds


# dp-accounting 0.6.0, pld/pld_privacy_accountant_test.py: test_gaussian_basic and
# test_poisson_subsampled_gaussian (both: ε = 1 at the stated δ, to 1e-3).
def test_dp_accounting_example_gaussian_composed_three_times() -> None:
    statement = hospital_level([UpdateNoiseEvent(math.sqrt(3), 1), UpdateNoiseEvent(math.sqrt(3), 2)], 0.126936)
    assert statement.epsilon == pytest.approx(1.0, abs=2e-3)


def test_dp_accounting_example_poisson_subsampled_gaussian() -> None:
    statement = record_level([DpSgdEvent(0.2, 0.5, 1), DpSgdEvent(0.2, 0.5, 2)], 0.15594)
    assert statement.epsilon == pytest.approx(1.0, abs=2e-3)


# dp-accounting 0.6.0, rdp/rdp_privacy_accountant_test.py: test_compute_epsilon_delta_gaussian
# (noise 4.530877117 chosen to give exactly (1, 1e-6) by RDP; our default orders are coarser).
def test_dp_accounting_example_rdp_gaussian() -> None:
    statement = record_level([DpSgdEvent(1.0, 4.530877117, 1)], 1e-6)
    assert statement.epsilon_by("rdp") == pytest.approx(1.0, abs=5e-3)
    assert statement.epsilon < statement.epsilon_by("rdp")  # PLD is tight, RDP an upper bound


def test_platform_notes_reference_numbers() -> None:
    assert record_level([DpSgdEvent(1 / 32, 1.0, 32)], 1e-5).epsilon_by("rdp") == pytest.approx(1.976, abs=1e-3)
    hospital = record_level(dp_sgd_rounds(480), 1e-5)
    assert hospital.epsilon == pytest.approx(8.7, abs=0.05)
    assert hospital.epsilon_by("rdp") == pytest.approx(9.60, abs=0.01)
    assert hospital_level([UpdateNoiseEvent(0.01)] * 12, 1e-5).epsilon == pytest.approx(61_477, rel=1e-3)
    assert hospital_level([UpdateNoiseEvent(1.0)] * 12, 1e-5).epsilon == pytest.approx(20.1, abs=0.05)


HISTORIES = [
    [(1.0, 1 / 15, 360)],  # (noise multiplier, sample rate, steps): 480 images, 12 rounds
    [(1.0, 32 / 101, 96)],
    [(1.0, 1 / 15, 180), (1.5, 0.1, 100)],  # two runs with different recipes
]


@pytest.mark.parametrize("history", HISTORIES)
def test_matches_opacus_rdp_accountant(history: list[tuple[float, float, int]]) -> None:
    from opacus.accountants import RDPAccountant

    ours = record_level([DpSgdEvent(q, z, steps) for z, q, steps in history], 1e-5)
    opacus = RDPAccountant()
    opacus.history = list(history)
    # Same orders and conversion; dp-accounting drops a few fractional orders it cannot evaluate
    # stably, which Opacus keeps: up to 0.1% apart.
    assert ours.epsilon_by("rdp") == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-3)


@pytest.mark.parametrize(
    "history",
    [
        pytest.param(HISTORIES[0], marks=pytest.mark.slow),
        pytest.param(HISTORIES[1], marks=pytest.mark.slow),
        HISTORIES[2],
    ],
)
def test_matches_opacus_prv_accountant(history: list[tuple[float, float, int]]) -> None:
    from opacus.accountants import PRVAccountant

    ours = record_level([DpSgdEvent(q, z, steps) for z, q, steps in history], 1e-5)
    opacus = PRVAccountant()
    opacus.history = list(history)
    assert ours.epsilon == pytest.approx(opacus.get_epsilon(1e-5), abs=0.05)  # PRV's own eps_error is 0.01


def test_composition_across_rounds_and_runs_is_order_free_and_merged() -> None:
    run_a = dp_sgd_rounds(480, rounds=5)
    run_b = dp_sgd_rounds(480, rounds=7)
    joined = record_level([*run_a, *run_b], 1e-5)
    assert joined.epsilon == record_level([*run_b, *run_a], 1e-5).epsilon
    assert joined.epsilon == record_level(dp_sgd_rounds(480, rounds=12), 1e-5).epsilon
    assert joined.events == (DpSgdEvent(32 / 480, 1.0, 360),)
    assert joined.epsilon > record_level(run_b, 1e-5).epsilon  # the earlier run is not forgotten


def test_a_gated_reply_counts_at_twice_the_sensitivity_per_record() -> None:
    """Against one record an untrusted ClientApp can move its clipped update anywhere in the
    C-ball: distance up to 2C, so z counts as z/2."""
    per_record = record_level([UpdateNoiseEvent(2.0, 12)], 1e-5)
    assert per_record.epsilon == pytest.approx(hospital_level([UpdateNoiseEvent(1.0, 12)], 1e-5).epsilon, rel=1e-9)
    replace = hospital_level([UpdateNoiseEvent(2.0, 12)], 1e-5, neighbouring="replace")
    assert replace.epsilon == pytest.approx(per_record.epsilon, rel=1e-9)


def test_no_noise_is_no_guarantee_and_nothing_is_zero() -> None:
    assert math.isinf(hospital_level([UpdateNoiseEvent(0.0, 1)], 1e-5).epsilon)
    assert math.isinf(record_level([DpSgdEvent(0.1, 0.0, 10), DpSgdEvent(0.1, 1.0, 10)], 1e-5).epsilon)
    assert record_level([], 1e-5).epsilon == 0.0
    assert record_level([DpSgdEvent(0.1, 1.0, 0)], 1e-5).epsilon == 0.0


def test_statement_is_canonical_json_with_decimal_strings_and_replays_exactly() -> None:
    statement = record_level([*dp_sgd_rounds(342), UpdateNoiseEvent(0.5, 2)], 1e-5)
    document = json.loads(statement.canonical())
    assert document["accountant"] == "pld" and document["delta"] == "1e-05" and document["level"] == "record"
    assert set(document["alongside"]) == {"rdp"}
    assert document["library"] == "dp-accounting 0.6.0"
    assert isinstance(document["epsilon"], str) and float(document["epsilon"]) == statement.epsilon
    replayed = record_level([event_from_json(e) for e in document["events"]], float(document["delta"]))
    assert replayed.epsilon == statement.epsilon  # a ledger's events give back the recorded ε exactly


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "dp-sgd", "sample_rate": 0.1, "noise_multiplier": "1.0", "steps": 3},  # float, not a string
        {"kind": "dp-sgd", "sample_rate": "0.1", "noise_multiplier": "1.0", "steps": 3, "extra": 1},
        {"kind": "laplace", "noise_multiplier": "1.0", "count": 1},
        {"kind": "update-noise", "noise_multiplier": "nan", "count": 1},
        {"kind": "update-noise", "noise_multiplier": "1.0", "count": -1},
        {"kind": "dp-sgd", "sample_rate": "1.5", "noise_multiplier": "1.0", "steps": 3},
        {"kind": "dp-sgd", "sample_rate": "0", "noise_multiplier": "1.0", "steps": 3},
    ],
)
def test_malformed_events_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(PrivacyError):
        event_from_json(bad)


def test_bad_delta_and_wrong_level_are_refused() -> None:
    for delta in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(PrivacyError, match="delta"):
            record_level([DpSgdEvent(0.1, 1.0, 1)], delta)
    with pytest.raises(PrivacyError, match="update-noise events only"):
        hospital_level([DpSgdEvent(0.1, 1.0, 1)], 1e-5)  # type: ignore[list-item]


def test_merge_sums_equal_mechanisms() -> None:
    merged = merge([DpSgdEvent(0.1, 1.0, 3), UpdateNoiseEvent(0.5), DpSgdEvent(0.1, 1.0, 4), UpdateNoiseEvent(0.5, 2)])
    assert merged == (DpSgdEvent(0.1, 1.0, 7), UpdateNoiseEvent(0.5, 3))


def test_calibrated_noise_is_the_smallest_that_meets_the_target() -> None:
    def history(z: float) -> list[DpSgdEvent]:
        return dp_sgd_rounds(480, rounds=3, z=z)

    z = calibrate_noise_multiplier(history, 3.0, 1e-5, tolerance=0.01)
    assert record_level(history(z), 1e-5).epsilon <= 3.0 < record_level(history(z - 0.01), 1e-5).epsilon


@pytest.mark.parametrize("z", [0.01, 0.5, 1.0, 3.0])
def test_gate_replies_alone_are_accounted_exactly_and_agree_with_the_pld(z: float) -> None:
    """A history of gate replies is one Gaussian mechanism: ε is exact ("gaussian"), never above
    the PLD's pessimistic figure and within its discretisation of it."""
    from fedgate.privacy.accountant import PLD_DISCRETISATION, _dp_events, _pld_epsilon

    events = merge([UpdateNoiseEvent(z, 7), UpdateNoiseEvent(2 * z, 5)])
    statement = hospital_level(events, 1e-5)
    assert statement.accountant == "gaussian" and statement.discretisation is None
    pld = _pld_epsilon(_dp_events(events, 1.0), 1e-5, max(PLD_DISCRETISATION, statement.epsilon_by("rdp") * 1e-5))
    assert statement.epsilon <= pld <= statement.epsilon * (1 + 1e-3) + 1e-2
    assert record_level(events, 1e-5).epsilon > statement.epsilon  # record level: sensitivity 2C
