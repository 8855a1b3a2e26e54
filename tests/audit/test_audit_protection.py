"""The simulated protection does what the policy says: clip to C, noise sigma, its share, DP-SGD."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_fixtures import one_thread  # noqa: F401  (an autouse fixture)
from fedgate.audit import AuditError, Protection
from fedgate.audit.protection import attacker_gradient
from fedgate.canonical import canonical_json
from fedgate.policy import load_policy


def _gradient(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


@settings(max_examples=50, deadline=None)
@given(scale=st.floats(1e-4, 1e4), clip_norm=st.floats(1e-3, 1e3), seed=st.integers(0, 2**32))
def test_gate_worst_case_fills_the_clip_ball_and_keeps_the_direction(scale: float, clip_norm: float, seed: int) -> None:
    gradient = _gradient(50, seed) * scale
    seen = Protection.gate(clip_norm, 0.0).apply(gradient, torch.Generator().manual_seed(1))
    assert float(seen.norm()) == pytest.approx(clip_norm)
    assert float(torch.nn.functional.cosine_similarity(attacker_gradient(seen), gradient, dim=0)) == pytest.approx(1)


def test_gate_clips_a_large_step_and_keeps_a_small_one() -> None:
    gradient = _gradient()
    small = Protection.gate(1.0, 0.0).apply(gradient, torch.Generator(), lr=1e-6)
    large = Protection.gate(1.0, 0.0).apply(gradient, torch.Generator(), lr=1.0)
    assert torch.allclose(small, -1e-6 * gradient)
    assert float(large.norm()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("protection", "sigma"),
    [
        (Protection.gate(2.0, 0.5), 1.0),
        (Protection.gate(2.0, 0.5, "distributed", 4), 0.5),
        (Protection.dp_sgd(2.0, 0.5), 1.0),
    ],
)
def test_noise_has_the_policy_sigma(protection: Protection, sigma: float) -> None:
    gradient = torch.zeros(200_000, dtype=torch.float64)
    gradient[0] = 1e-9  # a direction to scale; its signal is negligible next to the noise
    seen = protection.apply(gradient, torch.Generator().manual_seed(3), lr=1.0)
    assert protection.sigma == pytest.approx(sigma)
    assert float(seen.std()) == pytest.approx(sigma, rel=0.01)


def test_dp_sgd_clips_per_sample_before_the_noise() -> None:
    gradient = _gradient()
    seen = Protection.dp_sgd(1.5, 0.0).apply(gradient, torch.Generator(), lr=0.1)
    assert float(seen.norm()) == pytest.approx(0.15)


def test_the_sum_under_secure_aggregation_adds_the_other_hospitals() -> None:
    protection = Protection.gate(1.0, 0.0, "distributed", 3, "sum")
    mine, others = _gradient(seed=0), [_gradient(seed=1), _gradient(seed=2)]
    seen = protection.apply(mine, torch.Generator(), others=others)
    alone = Protection.gate(1.0, 0.0).apply(mine, torch.Generator())
    assert float(seen.norm()) > float(alone.norm()) * 1.5
    with pytest.raises(AuditError, match="2 other hospitals"):
        protection.apply(mine, torch.Generator())


def test_protection_from_the_shipped_policy() -> None:
    policy = load_policy(None)
    protection = Protection.from_policy(policy)
    assert (protection.kind, protection.clip_norm, protection.noise_multiplier) == ("gate", 1.0, 0.01)
    assert protection.sigma == pytest.approx(policy.sigma)


@pytest.mark.parametrize(
    "protection",
    [
        Protection.none(),
        Protection.gate(1.0, 0.01),
        Protection.gate(1.0, 0.05, "distributed", 5, "sum"),
        Protection.dp_sgd(1.0, 1.0),
    ],
)
def test_description_is_canonical_and_readable(protection: Protection) -> None:
    assert canonical_json(protection.describe())
    assert protection.label()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "magic"},
        {"kind": "gate", "clip_norm": 0.0},
        {"kind": "gate", "clip_norm": 1.0, "noise_multiplier": -1.0},
        {"kind": "gate", "clip_norm": 1.0, "noise_multiplier": math.nan},
        {"kind": "gate", "clip_norm": 1.0, "server_sees": "sum"},  # a sum needs distributed noise
    ],
)
def test_bad_protection_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(AuditError):
        Protection(**kwargs)  # type: ignore[arg-type]


def test_dp_sgd_worst_case_fills_the_clip_norm_even_for_a_small_gradient() -> None:
    small = _gradient() * 1e-6
    seen = Protection.dp_sgd(2.0, 0.0).apply(small, torch.Generator())
    assert float(seen.norm()) == pytest.approx(2.0)
