"""The reference ServerApp's federated evaluation: every `evaluate-every` rounds and after the
last one (the demo asks for the last one only; the server evaluates every round itself)."""

from __future__ import annotations

from typing import Any

import pytest
from flwr.serverapp.strategy import FedAvg

from fedgate_medical.server_app import FedAvgEvaluatingEvery
from fedgate_medical.task import AppConfig


def evaluated_rounds(every: int, rounds: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    asked: list[int] = []

    def configure(self: FedAvg, server_round: int, *args: Any) -> list[str]:
        asked.append(server_round)
        return ["an evaluate message"]

    monkeypatch.setattr(FedAvg, "configure_evaluate", configure)
    strategy = FedAvgEvaluatingEvery(rounds, every, fraction_train=1.0, fraction_evaluate=1.0)
    sent = [r for r in range(1, rounds + 1) if list(strategy.configure_evaluate(r, None, None, None))]  # type: ignore[arg-type]
    assert sent == asked  # a round either evaluates as FedAvg would, or sends nothing
    return sent


@pytest.mark.parametrize(
    ("every", "expected"), [(1, list(range(1, 13))), (0, [12]), (5, [5, 10, 12]), (12, [12]), (20, [12])]
)
def test_federated_evaluation_every_n_rounds_and_after_the_last(
    every: int, expected: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert evaluated_rounds(every, 12, monkeypatch) == expected


def test_the_app_evaluates_every_round_unless_told_otherwise() -> None:
    assert AppConfig().evaluate_every == 1
    assert AppConfig.from_run_config({"evaluate-every": 0}).evaluate_every == 0
