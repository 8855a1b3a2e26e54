"""The noise source: only OS entropy makes one, one reply per source, and what it draws is
exactly the rounded Gaussian rint(N(0, s^2)) the accounting assumes, by the compiled kernel
as by the first (numpy) implementation of the same float path."""

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


def _radii(words_u: np.ndarray, scale: float) -> np.ndarray:
    """The kernel's r = s·sqrt(-2 ln U) for these w_U (w_P = 0), as `integer_gaussian` computes it."""
    pairs = words_u.size
    words = np.zeros(BLOCK, dtype=np.uint64)
    words[:pairs] = words_u
    radius = np.empty(pairs)
    ints = np.empty((7, noise._CHUNK), dtype=np.uint64)
    noise._kernel()(words, pairs, scale, noise._RELATIVE, np.uint64(noise._U_LOW),
                    np.uint64(noise._U_HIGH - noise._U_LOW), np.empty(BLOCK), np.zeros(BLOCK, dtype=np.uint8),
                    ints, ints.view(np.float64), radius)  # fmt: skip
    return radius


def test_the_kernels_log_meets_the_samplers_assumption() -> None:
    """The float path assumes the log within 2^-45 relative (the kernel's is proven within
    2^-50): r = s·sqrt(-2 ln U) against mpmath at 200 bits, on uniforms from every range the
    sampler uses, near 2^-24 and near 1 included, and across binade edges."""
    rng = np.random.default_rng(7)
    edges = np.array([2**k for k in range(40, 64)] + [2**k - 1 for k in range(41, 64)], dtype=np.uint64)
    words = np.concatenate(
        [
            rng.integers(2**40, 2**63, 3000, dtype=np.uint64) * np.uint64(2),
            rng.integers(2**40, 2**44, 1000, dtype=np.uint64),
            np.uint64(2**64 - 2**39) - rng.integers(1, 2**50, 1000, dtype=np.uint64),
            edges,
            np.uint64(0xB504F333F9DE6484) + rng.integers(-(2**20), 2**20, 200).astype(np.uint64),  # m near sqrt 2
        ]
    )
    scale = 3.0
    radii = _radii(words, scale)
    mpmath.mp.prec = 200
    worst = 0.0
    for word, r in zip(words.tolist(), radii.tolist(), strict=True):
        u = (float(word) + 0.5) * 2.0**-64  # the float U the kernel takes the log of
        exact = scale * mpmath.sqrt(-2 * mpmath.log(mpmath.mpf(u)))
        worst = max(worst, abs(float((r - exact) / exact)))
    # r's relative error is half the log's, plus the sqrt's and the product's roundings
    assert worst < 2.0**-48, f"log2 of the worst relative error: {math.log2(worst):.2f}"


def _numpy_block(source: NoiseSource, stream: int, block: int, scale: float) -> np.ndarray:
    """The first implementation's float path (numpy, libm's log), for a full block: an
    independent oracle for the compiled kernel."""
    half = BLOCK // 2
    keystream, zeros = bytearray(BLOCK * 8), bytes(half * 8)
    counter = (stream << 96) | (block << 64)
    source._keystream(counter, memoryview(keystream)[: half * 8], zeros)
    source._keystream(counter + half // 2, memoryview(keystream)[half * 8 :], zeros)
    words = np.frombuffer(keystream, dtype="<u8")
    w_u, w_p = words[:half], words[half:]
    r = np.sqrt(np.log((w_u.astype(np.float64) + 0.5) * 2.0**-64) * (-2.0 * scale * scale))
    phi = ((w_p >> np.uint64(12)) | np.uint64(0x3FF0000000000000)).view(np.float64) - 1.0
    phi *= math.pi / 4
    phi2 = phi * phi
    sin = phi2 * noise._SIN[0]
    for coefficient in noise._SIN[1:-1]:
        sin += coefficient
        sin *= phi2
    sin += noise._SIN[-1]
    sin *= phi
    cos = np.sqrt(1.0 - sin * sin)
    first, second = sin * r, cos * r
    swap = (w_p & np.uint64(1)).astype(bool)
    first, second = np.where(swap, second, first), np.where(swap, first, second)
    first = np.where((w_p & np.uint64(2)).astype(bool), -first, first)
    second = np.where((w_p & np.uint64(4)).astype(bool), -second, second)
    z = np.concatenate([first, second])
    k = np.rint(z)
    margin = np.tile(0.5 - (r + scale) * noise._RELATIVE, 2)
    wide = np.tile((w_u - np.uint64(noise._U_LOW)) >= np.uint64(noise._U_HIGH - noise._U_LOW), 2)
    for index in np.flatnonzero((np.abs(z - k) >= margin) | wide).tolist():
        component, j = divmod(index, half)
        k[index] = source._exact(stream, block, j, (int(w_u[j]), int(w_p[j])), component, scale)
    return k


@pytest.mark.parametrize("scale", [0.7, 40.0, SHIPPED_SCALE, 2.0**19])
def test_the_compiled_kernel_draws_what_the_numpy_float_path_drew(scale: float) -> None:
    source = claimed()
    for stream, block in ((0, 0), (3, 11)):
        out = np.empty(BLOCK)
        source.integer_gaussian(stream, block, BLOCK, scale, out)
        assert np.array_equal(out, _numpy_block(source, stream, block, scale))


def test_compiling_the_kernel_draws_nothing() -> None:
    noise.compile_kernels()  # no source involved: nothing to claim, nothing drawn
    assert noise._COMPILED


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
