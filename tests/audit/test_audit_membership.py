"""Membership inference: AUC about 0.5 on a model that never saw the members, high on one
that memorised them; the AUC itself and its interval on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from audit_fixtures import one_thread, small_net  # noqa: F401  (one_thread: an autouse fixture)
from fedgate.audit import AuditError, membership_audit
from fedgate.audit.membership import auc, bootstrap_ci
from fedgate.audit.sources import to_model_space
from fedgate.canonical import canonical_json


def _noise_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images with random labels: nothing to generalise from, so only memorising fits them."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int64)


def _train(images: np.ndarray, labels: np.ndarray, steps: int = 60, seed: int = 0) -> nn.Module:
    model = small_net(seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = to_model_space(images), torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


MEMBERS = _noise_images(100, seed=1)
NONMEMBERS = _noise_images(100, seed=2)
OTHERS = _noise_images(100, seed=3)


def test_overfit_model_gives_its_members_away() -> None:
    model = _train(*MEMBERS)
    reference = _train(*OTHERS, seed=1)
    results = membership_audit(model, MEMBERS, NONMEMBERS, np.random.default_rng(0), reference, resamples=200)
    assert [r.method for r in results] == ["loss-threshold", "calibrated-loss"]
    loss, calibrated = results
    assert loss.auc > 0.85 and loss.ci_low > 0.75
    # Random labels make every image equally hard, so calibration only adds the reference's
    # noise here; it still tells members apart.
    assert calibrated.ci_low > 0.5
    assert canonical_json(loss.to_json()) and canonical_json(calibrated.to_json())


def test_model_that_never_saw_the_members_is_a_coin() -> None:
    model = _train(*OTHERS)
    reference = _train(*OTHERS, seed=1)
    results = membership_audit(model, MEMBERS, NONMEMBERS, np.random.default_rng(0), reference, resamples=200)
    for result in results:
        assert result.ci_low < 0.5 < result.ci_high
        assert abs(result.auc - 0.5) < 0.12


def test_auc_on_hand_made_scores() -> None:
    assert auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5


def test_bootstrap_interval_brackets_the_auc_and_is_seeded() -> None:
    rng = np.random.default_rng(5)
    members, nonmembers = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 200)
    low, high = bootstrap_ci(members, nonmembers, np.random.default_rng(0), 300)
    assert low < auc(members, nonmembers) < high
    assert (low, high) == bootstrap_ci(members, nonmembers, np.random.default_rng(0), 300)


def test_membership_needs_both_sets() -> None:
    empty = (np.zeros((0, 16, 16), np.uint8), np.zeros(0, np.int64))
    with pytest.raises(AuditError):
        membership_audit(small_net(), empty, NONMEMBERS, np.random.default_rng(0))
