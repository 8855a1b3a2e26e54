"""The main guarantee, tested so that it fails when it is gone: every update that leaves is
noised with the sigma the ledger states, and the bound the ledger records is the capacity of
that channel. `test_guarantees_need_the_noise.py` runs this file again with the noise removed
and requires it to fail."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from conftest import gate_for, instruction, through_gate

D = 100_000  # coordinates: enough for tight statistics, quick to gate


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"w": rng.normal(size=D).astype(np.float64), "step": np.array([1], dtype=np.int64)}


def _small_step(msg: Message) -> Message:
    """An update well inside the clip ball: what leaves is global + update + noise."""
    arrays = {k: a.numpy() for k, a in msg.content["arrays"].items()}
    arrays["w"] = arrays["w"] + 1e-4
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord({})}), reply_to=msg)


def _residual(tmp_path: Path, name: str, sigma_z: float = 0.01) -> tuple[np.ndarray, dict[str, str], dict[str, object]]:
    gate = gate_for(tmp_path / name, noise_multiplier=sigma_z)
    ins = instruction(tensors=_model())
    out = through_gate(gate, ins, _small_step)
    assert out.decision.sent and out.message is not None, out.decision.reason
    sent = out.message.content["arrays"]["w"].numpy()
    residual = sent - (_model()["w"] + 1e-4)
    update = next(s for s in out.decision.stages if s.stage == "update").detail
    return residual, update, gate.ledger.entries()[out.seq]


def test_two_identical_replies_leave_differently(tmp_path: Path) -> None:
    first, _, _ = _residual(tmp_path, "a")
    second, _, _ = _residual(tmp_path, "b")
    assert not np.array_equal(first, second)
    assert np.mean(first == second) < 0.01


def test_the_residual_is_gaussian_with_the_stated_sigma(tmp_path: Path) -> None:
    residual, update, _ = _residual(tmp_path, "c")
    sigma = float(update["sigma"])
    assert sigma == pytest.approx(0.01)
    standard_error = sigma / math.sqrt(2 * (D - 1))
    assert abs(residual.std() - sigma) < 6 * standard_error
    assert abs(residual.mean()) < 6 * sigma / math.sqrt(D)


def test_the_recorded_bound_is_the_capacity_of_the_noise_that_was_added(tmp_path: Path) -> None:
    residual, update, entry = _residual(tmp_path, "d")
    measured_sigma = float(residual.std())
    effective = float(update["effective_norm"])
    recorded_update_bits = float(entry["decision"]["bound"]["update_bits"])
    # the channel the ledger claims: capacity C_eff^2 / (2 sigma^2 ln 2) at the sigma it states...
    assert recorded_update_bits == pytest.approx(effective**2 / (2 * float(update["sigma"]) ** 2 * math.log(2)))
    # ...and that sigma is the one the reply actually carries
    assert measured_sigma == pytest.approx(float(update["sigma"]), rel=0.02)
