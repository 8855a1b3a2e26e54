"""The budget refuses, before it runs, the event that would take ε past max_epsilon, across runs."""

from __future__ import annotations

import json
import math

import pytest

from fedgate.privacy import DpSgdEvent, PrivacyBudget, PrivacyError, UpdateNoiseEvent, check_budget, record_level


def round_event(n: int = 480, batch: int = 32, epochs: int = 2, z: float = 1.0) -> DpSgdEvent:
    return DpSgdEvent(batch / n, z, epochs * math.ceil(n / batch))


def test_budget_refuses_the_round_that_would_pass_it_across_two_runs() -> None:
    """Run A did 6 rounds (ε ≈ 6.13); run B (a new run id, perhaps a new server) goes on. With
    max ε = 7, round 7 overall is allowed (≈ 6.61) and round 8 would pass it (≈ 7.07): the budget
    must refuse it before it runs, although run B alone has spent little."""
    budget = PrivacyBudget(max_epsilon=7.0, delta=1e-5)
    run_a = [round_event()] * 6
    run_b: list[DpSgdEvent] = []
    decisions = []
    for _ in range(4):
        decision = check_budget(budget, [*run_a, *run_b], [round_event()])
        decisions.append(decision)
        if not decision.allowed:
            break
        run_b.append(round_event())  # the round ran: it joins the history
    assert [d.allowed for d in decisions] == [True, False]
    refused = decisions[-1]
    assert refused.cumulative.epsilon > 7.0 >= record_level([*run_a, *run_b], 1e-5).epsilon
    # run B's own history would have allowed it: the join is what refuses
    assert check_budget(budget, run_b, [round_event()]).allowed
    assert refused.this_event.epsilon == pytest.approx(record_level([round_event()], 1e-5).epsilon)


def test_decision_is_canonical_evidence() -> None:
    decision = check_budget(PrivacyBudget(8.0, 1e-5), [round_event()] * 3, [round_event()])
    document = json.loads(decision.canonical())
    assert document["allowed"] is True and document["rule"] == "privacy.max_epsilon"
    assert document["budget"] == {"max_epsilon": "8.0", "delta": "1e-05", "level": "record"}
    assert float(document["cumulative"]["epsilon"]) == decision.cumulative.epsilon


def test_without_a_limit_nothing_is_refused_but_epsilon_is_still_recorded() -> None:
    decision = check_budget(PrivacyBudget(None, 1e-5), [UpdateNoiseEvent(0.01)] * 11, [UpdateNoiseEvent(0.01)])
    assert decision.allowed and decision.cumulative.epsilon > 60_000
    assert json.loads(decision.canonical())["budget"]["max_epsilon"] is None


def test_gated_replies_spend_the_per_patient_budget_too() -> None:
    budget = PrivacyBudget(max_epsilon=8.0, delta=1e-5)
    assert not check_budget(budget, [], [UpdateNoiseEvent(0.01)]).allowed  # the shipped z: ε in the thousands
    assert check_budget(budget, [], [UpdateNoiseEvent(2.0 * 2.08)]).allowed


def test_hospital_level_budget_counts_update_noise_only() -> None:
    budget = PrivacyBudget(max_epsilon=8.0, delta=1e-5, level="hospital")
    assert check_budget(budget, [UpdateNoiseEvent(2.08)] * 11, [UpdateNoiseEvent(2.08)]).allowed
    assert not check_budget(budget, [UpdateNoiseEvent(2.08)] * 12, [UpdateNoiseEvent(2.08)]).allowed
    with pytest.raises(PrivacyError, match="update-noise"):
        check_budget(budget, [round_event()], [UpdateNoiseEvent(2.08)])


@pytest.mark.parametrize("bad", [{"max_epsilon": 0.0}, {"max_epsilon": math.inf}, {"delta": 1.0}, {"delta": 0}])
def test_bad_budgets_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(PrivacyError):
        PrivacyBudget(**{"max_epsilon": 8.0, "delta": 1e-5, **bad})  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="event about to happen"):
        check_budget(PrivacyBudget(8.0, 1e-5), [], [])
