"""The noise source: only OS entropy makes one, one reply per source, and what it draws is
exactly the rounded Gaussian rint(N(0, s^2)) the accounting assumes."""

from __future__ import annotations

import copy
import inspect
import math
import pickle
from typing import Any

import mpmath
import numpy as np
import pytest
from scipy import stats

from fedgate.gate import noise
from fedgate.gate.noise import BLOCK, NoiseSource, NoiseSourceSpent

KEY = bytes(range(32))  # seeded here, in the tests only
SHIPPED_SCALE = 0.01 * 2.0**19  # sigma / g for the shipped policy (C = 1, z = 0.01) at 11.2M parameters


def claimed(key: bytes = KEY) -> NoiseSource:
    source = NoiseSource._for_tests(key)
    source.claim()
    return source


def fresh() -> NoiseSource:
    source = NoiseSource.from_os_entropy()
    source.claim()
    return source


def draw(source: NoiseSource, scale: float, blocks: int = 2, stream: int = 0) -> np.ndarray:
    """Blocks 0.. of a stream, from a claimed source."""
    out = np.empty(BLOCK)
    parts = []
    for block in range(blocks):
        source.integer_gaussian(stream, block, BLOCK, scale, out)
        parts.append(out.copy())
    return np.concatenate(parts)


def count_exact_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = noise._exact_round

    def counted(*args: Any) -> int | None:
        calls.append(1)
        result: int | None = original(*args)
        return result

    monkeypatch.setattr(noise, "_exact_round", counted)
    return calls


def test_only_os_entropy_constructs_a_source() -> None:
    with pytest.raises(TypeError, match="from_os_entropy"):
        NoiseSource(KEY)
    assert list(inspect.signature(NoiseSource.from_os_entropy).parameters) == []  # no seed to pass
    assert "TEST ONLY" in (NoiseSource._for_tests.__doc__ or "")
    assert repr(NoiseSource.from_os_entropy()) == "NoiseSource(<os entropy>)"


def test_a_source_cannot_be_copied_pickled_or_used_twice() -> None:
    source = NoiseSource.from_os_entropy()
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError):
            duplicate(source)
    out = np.empty(BLOCK)
    with pytest.raises(NoiseSourceSpent):  # not claimed yet: nobody can preview the noise
        source.integer_gaussian(0, 0, 10, 1.0, out)
    source.claim()
    source.integer_gaussian(0, 0, 10, 1.0, out)
    with pytest.raises(NoiseSourceSpent):
        source.claim()
    source.retire()
    with pytest.raises(NoiseSourceSpent):  # retired: nobody can recompute the noise that left
        source.integer_gaussian(0, 0, 10, 1.0, out)


def test_two_sources_never_draw_the_same_noise() -> None:
    a = draw(fresh(), SHIPPED_SCALE, blocks=1)
    b = draw(fresh(), SHIPPED_SCALE, blocks=1)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


def test_a_key_gives_the_same_noise_whatever_the_order_of_blocks() -> None:
    first = draw(claimed(), 3.0)
    out = np.empty(BLOCK)
    source = claimed()
    source.integer_gaussian(0, 1, BLOCK, 3.0, out)
    assert np.array_equal(out, first[BLOCK:])
    source.integer_gaussian(0, 0, 100, 3.0, out)
    assert np.array_equal(out[:100], first[:100])


@pytest.mark.parametrize("scale", [SHIPPED_SCALE, 2.0**19])
def test_moments_and_ks_at_the_gates_scales(scale: float) -> None:
    samples = draw(claimed(), scale)
    n = samples.size
    assert np.all(samples == np.rint(samples)), "integer-valued"
    variance = scale**2 + 1 / 12  # a rounded Gaussian (Sheppard)
    assert abs(samples.mean()) < 4 * math.sqrt(variance / n)
    assert abs(samples.var() - variance) < 4 * variance * math.sqrt(2 / n)
    assert stats.kstest(samples / scale, "norm").pvalue > 1e-3
    assert np.abs(samples).max() > 4 * scale, "the tails are there"


def test_small_scales_are_exactly_the_rounded_gaussian() -> None:
    """At scale 0.7 a rounded Gaussian differs visibly from a discrete or continuous one;
    chi-square against P(k) = Phi((k + 1/2)/s) - Phi((k - 1/2)/s)."""
    scale = 0.7
    samples = draw(claimed(), scale).astype(int)
    values = np.arange(-3, 4)
    observed = np.array([np.sum(samples == k) for k in values] + [np.sum(np.abs(samples) > 3)])
    p = stats.norm.cdf((values + 0.5) / scale) - stats.norm.cdf((values - 0.5) / scale)
    expected = np.append(p, 1 - p.sum()) * samples.size
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_streams_blocks_and_the_two_halves_of_a_pair_are_independent() -> None:
    source = claimed()
    a = draw(source, SHIPPED_SCALE, blocks=1, stream=0)
    b = draw(source, SHIPPED_SCALE, blocks=1, stream=1)
    c = draw(source, SHIPPED_SCALE, blocks=2, stream=0)[BLOCK:]
    half = BLOCK // 2
    limit = 5 / math.sqrt(half)
    for x, y in ((a, b), (a, c), (a[:half], a[half:]), (a[:half] ** 2, a[half:] ** 2)):
        assert abs(np.corrcoef(x[:half], y[:half])[0, 1]) < limit


@pytest.mark.parametrize("scale", [1.5, SHIPPED_SCALE, 2.0**19])
def test_the_float_path_agrees_with_interval_arithmetic(scale: float) -> None:
    """Every K the fast path returns must be the rint of s·Z over the whole cell of the
    true uniforms, as mpmath's interval arithmetic computes it."""
    source = claimed()
    out = np.empty(BLOCK)
    source.integer_gaussian(5, 9, BLOCK, scale, out)
    pairs = BLOCK // 2
    words = np.frombuffer(noise._workspace().keystream, dtype="<u8", count=2 * pairs)
    for j in range(0, pairs, 1021):
        for component in (0, 1):
            exact = source._exact(5, 9, j, (int(words[j]), int(words[pairs + j])), component, scale)
            assert exact == out[j + component * pairs]


def test_the_exact_path_gives_the_same_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tolerance so wide that about 1 % of samples go to interval arithmetic, the draw
    is unchanged: the exact path and the float path compute the same function."""
    expected = np.empty(BLOCK)
    claimed().integer_gaussian(0, 0, 4000, 40.0, expected)
    monkeypatch.setattr(noise, "_RELATIVE", 2.0**-13)
    calls = count_exact_calls(monkeypatch)
    got = np.empty(BLOCK)
    claimed().integer_gaussian(0, 0, 4000, 40.0, got)
    assert len(calls) > 10
    assert np.array_equal(got[:4000], expected[:4000])


def test_pairs_with_coarse_uniforms_take_the_exact_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """U's cell is too wide for the float check below _U_LOW: those pairs must be redone
    exactly. Raised so that 1/16 of the pairs qualify, the draw must not change."""
    expected = np.empty(BLOCK)
    claimed().integer_gaussian(2, 0, 300, SHIPPED_SCALE, expected)
    monkeypatch.setattr(noise, "_U_LOW", 1 << 60)
    calls = count_exact_calls(monkeypatch)
    got = np.empty(BLOCK)
    claimed().integer_gaussian(2, 0, 300, SHIPPED_SCALE, got)
    assert len(calls) >= 3
    assert np.array_equal(got[:300], expected[:300])


def test_a_cell_across_a_half_integer_is_refined_not_guessed() -> None:
    # U in [1/4, 1/2), psi in [0, 1): y spans many integers, so nothing can be decided yet
    assert noise._exact_round(1, 2, 0, 1, 0, 0, 10.0) is None
    # the same U, psi pinned to a 2^-200 cell: decided
    assert isinstance(noise._exact_round(2**198, 200, 2**199, 200, 0, 0, 10.0), int)


def test_this_platforms_log_and_sqrt_meet_the_samplers_assumption() -> None:
    """The float path assumes numpy's log within 2^-45 relative (and IEEE sqrt); check it on
    uniforms from all the ranges the sampler uses, near 0 and near 1 included."""
    rng = np.random.default_rng(7)
    words = np.concatenate(
        [
            rng.integers(2**40, 2**63, 3000, dtype=np.uint64) * 2,
            (2**64 - 2**39 - rng.integers(1, 2**50, 1000, dtype=np.uint64)),
        ]
    )
    u = (words.astype(np.float64) + 0.5) * 2.0**-64
    logs = np.log(u)
    roots = np.sqrt(-2.0 * logs)
    mpmath.mp.prec = 200
    worst_log = max(
        abs(float((mpmath.log(mpmath.mpf(x)) - float(y)) / mpmath.log(mpmath.mpf(x))))
        for x, y in zip(u, logs, strict=True)
    )
    worst_sqrt = max(
        abs(float((mpmath.sqrt(mpmath.mpf(x)) - float(y)) / mpmath.sqrt(mpmath.mpf(x))))
        for x, y in zip(-2.0 * logs, roots, strict=True)
    )
    assert worst_log < 2.0**-45
    assert worst_sqrt <= 2.0**-53


def test_bad_arguments_are_refused() -> None:
    source = claimed()
    out = np.empty(BLOCK)
    for scale in (0.0, -1.0, math.inf, math.nan, 2.0**41):
        with pytest.raises(ValueError):
            source.integer_gaussian(0, 0, 10, scale, out)
    with pytest.raises(ValueError):
        source.integer_gaussian(0, 0, BLOCK + 1, 1.0, out)
    with pytest.raises(ValueError):
        source.integer_gaussian(0, 0, 10, 1.0, np.empty(10, dtype=np.float32))
