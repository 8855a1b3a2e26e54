"""SecAgg+ run by the gates in Flower's simulation engine (Ray), each hospital's ClientApp in its
sandbox: the aggregate against FedAvg of the gated replies, a dropped hospital, and a round with
too few survivors stopping the run with an error in its output. Slow (Ray, sandboxes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate
from inprocess import distributed
from simulated import simulate

import fedgate.secagg.handler as handler_module
from conftest import policy_with
from fedgate.gate.decode import decode_record
from fedgate.secagg import SecAggPolicy
from fedgate.secagg.records import secagg_summary

pytestmark = pytest.mark.slow
SECAGG = SecAggPolicy(enabled=True, threshold=3, assumed_honest=3)


def test_simulation_aggregate_with_one_dropped_and_a_loud_failure_with_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released: dict[int, dict[str, np.ndarray]] = {}
    original = handler_module._mask

    def spy(session: Any, admission: Any, bound: Any, content: Any, decision: Any) -> Any:
        model = decode_record(content[admission.instruction.model_key])
        released[session.node_id] = {name: np.array(value) for name, value in model.items()}
        return original(session, admission, bound, content, decision)

    monkeypatch.setattr(handler_module, "_mask", spy)
    policy = distributed(policy_with(), 3)
    model_file = tmp_path / "final.npz"
    config = {"num-server-rounds": 1, "secagg-num-shares": 5, "secagg-threshold": 3, "fail-partitions": "2",
              "model-file": str(model_file)}  # fmt: skip
    result = simulate(tmp_path / "ok", 5, "secagg_apps:app", "secagg_server_app:app", policy, SECAGG, config)
    assert result.returncode == 0, result.log[-3000:]
    final = [np.load(model_file)[f"arr_{i}"] for i in range(3)]
    assert len(released) == 4
    expected = aggregate([([r[k] for k in ("0", "1", "2")], 1) for r in released.values()])
    for got, want in zip(final[:2], expected[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    hospitals = [tmp_path / "ok" / f"hospital-{i}" for i in range(5)]
    assert secagg_summary(hospitals, result.run_id) == {"enabled": True, "num_shares": 5, "threshold": 3,
                                                         "dropped": ["hospital-2"]}  # fmt: skip

    config["fail-partitions"] = "0,2,4"
    failed = simulate(tmp_path / "fail", 5, "secagg_apps:app", "secagg_server_app:app", policy, SECAGG, config)
    assert failed.returncode == 2
    assert "error: secure aggregation round 1 failed at the collect masked vectors stage: 2 of 5" in failed.log
