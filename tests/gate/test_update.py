"""Algebraic laws of clipping, quantisation and the noise's sigma."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedgate.gate.update import add_noise, capacity_bits, clip, fresh_generator, l2_norm
from fedgate.policy.model import MetricRule, NumExamplesRule

finite = st.floats(-1e6, 1e6, allow_nan=False, width=64)
tensor = arrays(np.float64, st.integers(1, 40), elements=finite)


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(tensor, min_size=1, max_size=4), clip_norm=st.floats(1e-3, 1e3))
def test_clipped_norm_is_within_the_ball(parts: list[np.ndarray], clip_norm: float) -> None:
    update = {f"t{i}": p for i, p in enumerate(parts)}
    clipped, norm, scale = clip(update, clip_norm)
    assert l2_norm(clipped) <= clip_norm * (1 + 1e-9)
    assert norm == pytest.approx(l2_norm(update))
    assert 0 < scale <= 1


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(tensor, min_size=1, max_size=4), clip_norm=st.floats(1e-3, 1e3))
def test_update_inside_the_ball_is_unchanged(parts: list[np.ndarray], clip_norm: float) -> None:
    update = {f"t{i}": p for i, p in enumerate(parts)}
    norm = l2_norm(update)
    if norm == 0:
        return
    inside = {k: v * (clip_norm * 0.999 / norm) for k, v in update.items()}
    clipped, _, scale = clip(inside, clip_norm)
    assert scale == 1.0
    assert all(np.array_equal(clipped[k], inside[k]) for k in inside)


@settings(max_examples=300, deadline=None)
@given(
    value=st.floats(-1e4, 1e4, allow_nan=False),
    lo=st.floats(-100, 100),
    width=st.floats(0.01, 1000),
    steps=st.integers(1, 500),
)
def test_quantised_metrics_take_only_declared_values(value: float, lo: float, width: float, steps: int) -> None:
    rule = MetricRule(step=width / steps, min=lo, max=lo + width)
    q = rule.quantise(value)
    assert rule.min - 1e-9 <= q <= rule.max + 1e-9
    index = (q - rule.min) / rule.step
    assert abs(index - round(index)) < 1e-6, "not on the grid"
    assert 0 <= round(index) < rule.levels


@settings(max_examples=200, deadline=None)
@given(value=st.integers(0, 10**7), step=st.integers(1, 1000), buckets=st.integers(1, 1000))
def test_num_examples_buckets(value: int, step: int, buckets: int) -> None:
    rule = NumExamplesRule("bucket", step, step * buckets)
    q = rule.quantise(value)
    assert q % step == 0 and step <= q <= rule.max
    assert q // step - 1 < rule.levels
    assert NumExamplesRule("constant", step, step).quantise(value) == 1


def test_noise_has_the_configured_sigma() -> None:
    sigma = 0.37
    generator = np.random.default_rng(12345)  # seeded here, in the test only
    update = {"a": np.zeros((300, 300)), "b": np.zeros(10_000)}
    noised = add_noise(update, sigma, generator)
    samples = np.concatenate([noised["a"].ravel(), noised["b"].ravel()])
    n = samples.size
    # sample std of n normals: standard error sigma / sqrt(2n); allow 5 standard errors
    assert abs(samples.std() - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert abs(samples.mean()) < 5 * sigma / math.sqrt(n)
    from scipy import stats

    assert stats.kstest(samples / sigma, "norm").pvalue > 1e-3


def test_production_generators_differ_per_reply() -> None:
    a = fresh_generator().normal(size=8)
    b = fresh_generator().normal(size=8)
    assert not np.array_equal(a, b)


def test_capacity_bound() -> None:
    assert capacity_bits(1.0, 1.0) == pytest.approx(1 / (2 * math.log(2)))
    assert capacity_bits(2.0, 1.0) == pytest.approx(4 * capacity_bits(1.0, 1.0))
    assert capacity_bits(1.0, 0.0) == math.inf
