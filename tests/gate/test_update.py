"""The clip + grid + noise stage: its algebraic laws (clipping, the grid, the bound), its
noise (the right sigma, never the same twice) and the tensors it accepts; and the laws of
metric quantisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from fedgate.canonical import canonical_json
from fedgate.errors import GateRefusal
from fedgate.gate.noise import BLOCK, NoiseSource, NoiseSourceSpent
from fedgate.gate.update import (
    NORM_SLACK,
    NoisedUpdate,
    capacity_bits,
    compile_kernels,
    effective_norm,
    grid_step,
    l2_norm,
    noised_update,
)
from fedgate.policy.model import MetricRule, NumExamplesRule

KEY = bytes(range(32))  # seeded here, in the tests only
RESNET = 11_168_706  # parameters of the reference app's ResNet-18-style model

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
tensor = arrays(np.float64, st.integers(0, 40), elements=finite)


def noise_of(update: NoisedUpdate, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The integer noise K that `KEY` draws for these tensors: block b of the coordinates laid
    end to end is block b of stream 0."""
    grid, sigma = update.evidence.grid_step, update.evidence.sigma
    twin = NoiseSource._for_tests(KEY)
    twin.claim()
    total = sum(math.prod(shape) for shape in shapes)
    flat, out = np.empty(total), np.empty(BLOCK)
    for block, start in enumerate(range(0, total, BLOCK)):
        count = min(BLOCK, total - start)
        twin.integer_gaussian(0, block, count, sigma / grid, out)
        flat[start : start + count] = out[:count]
    offsets = np.cumsum([0] + [math.prod(shape) for shape in shapes])
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(shapes))]


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(tensor, min_size=1, max_size=4), clip_norm=st.floats(1e-2, 1e2), z=st.floats(1e-3, 10))
def test_the_released_update_is_on_the_grid_and_within_the_effective_norm(
    parts: list[np.ndarray], clip_norm: float, z: float
) -> None:
    """With a zero global model in float64 the output is g·(v + K) exactly: every value on the
    grid, and g·v (the output less the noise) within C + g·sqrt(d)/2."""
    zeros = [np.zeros_like(p) for p in parts]
    update = noised_update(zeros, parts, clip_norm, z * clip_norm, NoiseSource._for_tests(KEY))
    grid = update.evidence.grid_step
    units = [a / grid for a in update.arrays]
    assert all(np.array_equal(u, np.rint(u)) for u in units), "off the grid"
    v = [u - k for u, k in zip(units, noise_of(update, [p.shape for p in parts]), strict=True)]
    d = sum(p.size for p in parts)
    assert grid * l2_norm(v) <= update.evidence.effective_norm
    assert update.evidence.effective_norm <= clip_norm * (1 + NORM_SLACK) + grid * math.sqrt(d) / 2
    assert update.evidence.norm == pytest.approx(l2_norm(parts), rel=1e-12)
    if update.evidence.norm <= clip_norm:  # inside the ball: only rounded to the grid
        assert not update.evidence.clipped and update.evidence.scale == 1.0
        assert all(np.array_equal(x, np.rint(p / grid)) for x, p in zip(v, parts, strict=True))
    else:
        assert update.evidence.clipped and update.evidence.scale < 1.0
        assert grid * l2_norm(v) >= clip_norm - grid * math.sqrt(d) / 2


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(tensor, min_size=1, max_size=4), clip_norm=st.floats(1e-2, 1e2))
def test_without_noise_the_update_is_only_clipped(parts: list[np.ndarray], clip_norm: float) -> None:
    base = [np.full_like(p, 0.25) for p in parts]
    replies = [b + p for b, p in zip(base, parts, strict=True)]
    update = noised_update(base, replies, clip_norm, 0.0, NoiseSource._for_tests(KEY))
    sent = [a - b for a, b in zip(update.arrays, base, strict=True)]
    assert l2_norm(sent) <= clip_norm * (1 + 1e-9)
    assert update.evidence.update_bits == math.inf and update.evidence.grid_step == 0.0
    if update.evidence.norm <= clip_norm:
        assert all(np.array_equal(a, r) for a, r in zip(update.arrays, replies, strict=True))


@pytest.mark.parametrize("clip_norm", [1e-3, 1e3])
def test_the_kernels_compute_the_mechanism_coordinate_by_coordinate(clip_norm: float) -> None:
    """global + g·(rint((reply - global)·scale / g) + K), in float64, cast to each dtype: the
    compiled kernels (float32, float64) and numpy (float16) against the formula in numpy,
    tensors crossing block boundaries, the update clipped (1e-3) or not (1e3)."""
    rng = np.random.default_rng(11)
    shapes = [(BLOCK + 3,), (7, 5), (2 * BLOCK - 10,)]
    dtypes = [np.float32, np.float16, np.float64]
    base = [rng.standard_normal(shape).astype(dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]
    reply = [(b + 0.01 * rng.standard_normal(b.shape)).astype(b.dtype) for b in base]
    for array in base + reply:
        array.flags.writeable = False  # as decoded: read-only views
    update = noised_update(base, reply, clip_norm, 0.05, NoiseSource._for_tests(KEY), threads=2)
    evidence = update.evidence
    differences = [(r.astype(np.float64) - b.astype(np.float64)).ravel() for r, b in zip(reply, base, strict=True)]
    assert evidence.norm == pytest.approx(math.sqrt(sum(float(np.dot(d, d)) for d in differences)), rel=1e-12)
    assert evidence.clipped == (clip_norm == 1e-3)
    factor = evidence.scale / evidence.grid_step
    for sent, b, d, k in zip(update.arrays, base, differences, noise_of(update, shapes), strict=True):
        released = (np.rint(d * factor) + k) * evidence.grid_step
        expected = (released + b.ravel().astype(np.float64)).astype(b.dtype).reshape(b.shape)
        assert np.array_equal(sent, expected)


def test_compiling_the_kernels_draws_nothing() -> None:
    compile_kernels()
    source = NoiseSource.from_os_entropy()
    noised_update([np.zeros(3)], [np.ones(3)], 1.0, 0.1, source)  # the source was still fresh


def test_the_noise_has_the_configured_sigma() -> None:
    """Goes red if the noise is removed or mis-scaled: a reply equal to the global model
    leaves exactly g·K, which must be N(0, sigma^2) (moments and KS on 120,000 samples)."""
    sigma = 0.37
    base: list[np.ndarray] = [np.zeros((300, 300)), np.zeros(30_000)]
    update = noised_update(base, base, 1.0, sigma, NoiseSource._for_tests(KEY))
    samples = np.concatenate([a.ravel() for a in update.arrays])
    n = samples.size
    assert update.evidence.norm == 0.0 and not update.evidence.clipped
    assert abs(samples.mean()) < 4 * sigma / math.sqrt(n)
    assert abs(samples.std() - sigma) < 4 * sigma / math.sqrt(2 * n)
    assert stats.kstest(samples / sigma, "norm").pvalue > 1e-3


def test_two_gates_with_the_same_inputs_never_send_the_same_noise() -> None:
    base = [np.zeros(50_000, dtype=np.float32)]
    reply = [np.full(50_000, 1e-4, dtype=np.float32)]
    a = noised_update(base, reply, 1.0, 0.01, NoiseSource.from_os_entropy()).arrays[0]
    b = noised_update(base, reply, 1.0, 0.01, NoiseSource.from_os_entropy()).arrays[0]
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(a - 1e-4, b - 1e-4)[0, 1]) < 5 / math.sqrt(a.size), "noise of two replies correlated"


def test_a_source_serves_one_reply_and_is_retired_after_it() -> None:
    source = NoiseSource.from_os_entropy()
    base = [np.zeros(10)]
    noised_update(base, base, 1.0, 0.1, source)
    with pytest.raises(NoiseSourceSpent):
        noised_update(base, base, 1.0, 0.1, source)
    with pytest.raises(NoiseSourceSpent):  # the noise that left cannot be recomputed
        source.integer_gaussian(0, 0, 10, 1.0, np.empty(BLOCK))
    failing = NoiseSource.from_os_entropy()
    with pytest.raises(ValueError):
        noised_update(base, [np.zeros(11)], 1.0, 0.1, failing)
    failing.claim()  # a refused call leaves the source unused


def test_the_result_does_not_depend_on_the_number_of_threads() -> None:
    rng = np.random.default_rng(3)
    base = [rng.standard_normal((BLOCK + 17,)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)]
    reply = [b + np.float32(0.01) for b in base]
    one = noised_update(base, reply, 1.0, 0.05, NoiseSource._for_tests(KEY), threads=1)
    two = noised_update(base, reply, 1.0, 0.05, NoiseSource._for_tests(KEY), threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(one.arrays, two.arrays, strict=True))
    assert one.evidence == two.evidence


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_shapes_and_fresh_read_only_buffers(dtype: type) -> None:
    base: list[np.ndarray] = [np.ones((4, 3), dtype=dtype), np.zeros((0, 7), dtype=dtype), np.ones(5, dtype=dtype)]
    for array in base:
        array.flags.writeable = False  # as decoded: read-only views
    reply = [b + dtype(0.5) for b in base]
    update = noised_update(base, reply, 1.0, 0.01, NoiseSource._for_tests(KEY))
    for sent, b in zip(update.arrays, base, strict=True):
        assert sent.dtype == b.dtype and sent.shape == b.shape
        assert sent.flags.c_contiguous and not sent.flags.writeable and sent.base is None
        assert not np.shares_memory(sent, b)
    assert update.evidence.coordinates == 17
    assert update.evidence.clipped  # the update's norm is 0.5·sqrt(17) > 1


def test_a_reply_equal_to_the_global_model_and_no_tensors_at_all() -> None:
    base = [np.linspace(-1, 1, 1000, dtype=np.float32)]
    update = noised_update(base, base, 1.0, 0.0, NoiseSource._for_tests(KEY))
    assert update.evidence.norm == 0.0 and update.evidence.scale == 1.0
    assert np.array_equal(update.arrays[0], base[0])
    empty = noised_update([], [], 1.0, 0.01, NoiseSource._for_tests(KEY))
    assert empty.arrays == () and empty.evidence.coordinates == 0


def test_non_finite_tensors_are_refused_by_name() -> None:
    base = [np.zeros(10, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    for bad in (np.nan, np.inf, -np.inf):
        reply = [np.zeros(10, dtype=np.float32), np.array([0, bad, 0], dtype=np.float32)]
        with pytest.raises(GateRefusal, match=r"conv\.bias") as refused:
            noised_update(base, reply, 1.0, 0.01, NoiseSource._for_tests(KEY), names=["conv.weight", "conv.bias"])
        assert refused.value.rule == "non-finite"


def test_huge_float64_tensors_are_clipped_not_overflowed() -> None:
    base = [np.array([1e200, 0.0]), np.array([1.7e308])]
    reply = [np.array([-1e200, 0.0]), np.array([1.7e308])]
    update = noised_update(base, reply, 1.0, 0.0, NoiseSource._for_tests(KEY))
    assert update.evidence.norm == pytest.approx(2e200, rel=1e-12)  # its square overflows float64
    assert update.evidence.scale == pytest.approx(0.5e-200, rel=1e-12)
    assert all(np.all(np.isfinite(a)) for a in update.arrays)
    # a difference beyond float64: its norm is infinite, the update scaled to nothing
    update = noised_update([np.array([-1.7e308])], [np.array([1.7e308])], 1.0, 0.1, NoiseSource._for_tests(KEY))
    assert update.evidence.clipped and update.evidence.scale == 0.0
    assert np.isfinite(update.arrays[0]).all()


def test_mismatched_tensors_are_a_programming_error() -> None:
    with pytest.raises(ValueError):
        noised_update([np.zeros(3)], [np.zeros(4)], 1.0, 0.1, NoiseSource._for_tests(KEY))
    with pytest.raises(ValueError):
        noised_update(
            [np.zeros(3, dtype=np.int64)], [np.zeros(3, dtype=np.int64)], 1.0, 0.1, NoiseSource._for_tests(KEY)
        )


def test_the_evidence_is_canonical_and_the_bound_uses_the_effective_norm() -> None:
    base = [np.zeros(100, dtype=np.float32)]
    update = noised_update(base, base, 2.0, 0.5, NoiseSource._for_tests(KEY))
    record = update.to_json()
    canonical_json(record)  # no floats
    evidence = update.evidence
    assert evidence.update_bits == capacity_bits(evidence.effective_norm, 0.5)
    assert evidence.effective_norm > 2.0
    assert record["grid_step_log2"] == math.frexp(evidence.grid_step)[1] - 1
    assert 2.0 ** record["grid_step_log2"] == evidence.grid_step
    assert record["sampler"].startswith("rounded-gaussian")


@pytest.mark.parametrize("z", [0.001, 0.01, 0.1, 1.0, 10.0, 1000.0])
@pytest.mark.parametrize("coordinates", [1, 63_000, RESNET, 10**9])
def test_the_grid_costs_under_one_percent_of_the_bound(z: float, coordinates: int) -> None:
    clip_norm = 1.0
    sigma = z * clip_norm
    grid = grid_step(sigma, clip_norm, coordinates)
    assert grid == 2.0 ** round(math.log2(grid)), "a power of two"
    assert grid <= sigma * 2.0**-8
    bits = capacity_bits(effective_norm(clip_norm, grid, coordinates), sigma)
    assert bits <= 1.01 * capacity_bits(clip_norm, sigma)
    assert bits > capacity_bits(clip_norm, sigma)


def test_capacity_bound() -> None:
    assert capacity_bits(1.0, 1.0) == pytest.approx(1 / (2 * math.log(2)))
    assert capacity_bits(2.0, 1.0) == pytest.approx(4 * capacity_bits(1.0, 1.0))
    assert capacity_bits(1.0, 0.0) == math.inf


def test_l2_norm_accumulates_in_float64() -> None:
    big = np.full(3 * BLOCK + 5, 3.0, dtype=np.float16)
    assert l2_norm([big, np.array([4.0], dtype=np.float32)]) == pytest.approx(math.sqrt(9 * big.size + 16), rel=1e-15)
    assert l2_norm({"a": np.array([3.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}) == 5.0


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


# -- noise drawn before the reply (issue 15) ---------------------------------------------------


def _model(seed: int, sizes: tuple[int, ...] = (3 * BLOCK // 2, 17, BLOCK + 5)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


def test_predrawn_noise_is_the_noise_the_stage_draws_itself() -> None:
    """Same key, same blocks of the same stream: drawing at admission changes nothing in what
    is released (so every law of the noise tested above holds for it)."""
    from fedgate.gate.update import PredrawnNoise

    base, reply = _model(1), _model(2)
    coordinates = sum(a.size for a in base)
    inline = noised_update(base, reply, 1.0, 0.05, NoiseSource._for_tests(KEY))
    early = PredrawnNoise(coordinates, 1.0, 0.05, NoiseSource._for_tests(KEY), threads=2)
    predrawn = noised_update(base, reply, 1.0, 0.05, early)
    for a, b in zip(inline.arrays, predrawn.arrays, strict=True):
        assert a.tobytes() == b.tobytes()
    assert predrawn.evidence == inline.evidence


def test_predrawn_noise_serves_one_reply_and_retires_its_source() -> None:
    from fedgate.gate.update import PredrawnNoise

    base, reply = _model(3), _model(4)
    coordinates = sum(a.size for a in base)
    source = NoiseSource.from_os_entropy()
    early = PredrawnNoise(coordinates, 1.0, 0.05, source)
    with pytest.raises(ValueError, match="another model or policy"):
        noised_update(base, reply, 1.0, 0.1, early)  # not the sigma it was drawn for: refused, and spent
    with pytest.raises(NoiseSourceSpent):
        noised_update(base, reply, 1.0, 0.05, early)
    with pytest.raises(NoiseSourceSpent):
        source.claim()  # claimed at the start of the drawing: never a second reply's noise
    again = PredrawnNoise(coordinates, 1.0, 0.05, NoiseSource.from_os_entropy())
    first = noised_update(base, reply, 1.0, 0.05, again)
    other = noised_update(base, reply, 1.0, 0.05, PredrawnNoise(coordinates, 1.0, 0.05, NoiseSource.from_os_entropy()))
    assert not np.array_equal(first.arrays[0], other.arrays[0])  # two replies, two noises


def test_a_failed_predraw_fails_the_reply_not_silently_unnoised(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgate.gate.update import PredrawnNoise

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("no entropy")

    monkeypatch.setattr(NoiseSource, "integer_gaussian", broken)
    base, reply = _model(5), _model(6)
    early = PredrawnNoise(sum(a.size for a in base), 1.0, 0.05, NoiseSource.from_os_entropy())
    with pytest.raises(OSError, match="no entropy"):
        noised_update(base, reply, 1.0, 0.05, early)
