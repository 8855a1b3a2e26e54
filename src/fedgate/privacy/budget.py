"""The hospital's privacy budget: refuse an event *before* it runs when it would pass max ε.

The decision is taken on the composition of the whole history (every run, every round) plus
the event about to happen, with the primary (PLD) accountant, whose figure is an upper bound;
so an event that is allowed can never take the cumulative ε past the budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedgate.canonical import canonical_json
from fedgate.privacy.accountant import hospital_level, record_level
from fedgate.privacy.events import PrivacyError, PrivacyEvent, UpdateNoiseEvent, exact_str
from fedgate.privacy.statement import EpsilonStatement, Level


@dataclass(frozen=True)
class PrivacyBudget:
    """`[privacy] max_epsilon` at `delta`, for one level (per patient by default). With
    `max_epsilon=None` nothing is refused, but every decision still carries the round's and the
    cumulative ε for the ledger."""

    max_epsilon: float | None
    delta: float
    level: Level = "record"

    def __post_init__(self) -> None:
        if self.max_epsilon is not None and (
            isinstance(self.max_epsilon, bool)
            or not isinstance(self.max_epsilon, int | float)
            or not math.isfinite(self.max_epsilon)
            or self.max_epsilon <= 0
        ):
            raise PrivacyError(f"max_epsilon must be a positive finite number, got {self.max_epsilon!r}")
        if isinstance(self.delta, bool) or not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.level not in ("record", "hospital"):
            raise PrivacyError(f"level must be 'record' or 'hospital', got {self.level!r}")

    def to_json(self) -> dict[str, Any]:
        limit = None if self.max_epsilon is None else exact_str(self.max_epsilon)
        return {"max_epsilon": limit, "delta": exact_str(self.delta), "level": self.level}


@dataclass(frozen=True)
class BudgetDecision:
    """`allowed` iff `cumulative` (history + next) stays within the budget. `this_event` is the
    next event's ε on its own (what the round costs), `cumulative` what the hospital will have spent."""

    allowed: bool
    budget: PrivacyBudget
    this_event: EpsilonStatement
    cumulative: EpsilonStatement

    @property
    def rule(self) -> str:
        return "privacy.max_epsilon"

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "rule": self.rule,
            "budget": self.budget.to_json(),
            "this_event": self.this_event.to_json(),
            "cumulative": self.cumulative.to_json(),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())


def _compose(level: Level, events: Sequence[PrivacyEvent], delta: float) -> EpsilonStatement:
    if level == "record":
        return record_level(events, delta)
    updates: list[UpdateNoiseEvent] = []
    for event in events:
        if not isinstance(event, UpdateNoiseEvent):
            raise PrivacyError(f"a hospital-level budget counts update-noise events only, got {event!r}")
        updates.append(event)
    return hospital_level(updates, delta)


def check_budget(
    budget: PrivacyBudget, history: Iterable[PrivacyEvent], next_events: Iterable[PrivacyEvent]
) -> BudgetDecision:
    """Would `next_events` take the composed ε of `history` + `next_events` over the budget?
    Call it before the round trains; record the decision; send nothing when it is refused."""
    upcoming = list(next_events)
    if not upcoming:
        raise PrivacyError("check_budget needs the event about to happen")
    this_event = _compose(budget.level, upcoming, budget.delta)
    cumulative = _compose(budget.level, [*history, *upcoming], budget.delta)
    allowed = budget.max_epsilon is None or cumulative.epsilon <= budget.max_epsilon
    return BudgetDecision(allowed, budget, this_event, cumulative)
