"""Masks from ChaCha20 under the whole 256-bit seed, and the integer encoding that makes the
masked sum the exact sum of the released updates."""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.errors import GateRefusal
from fedgate.secagg import masks
from fedgate.secagg.encoding import DEFAULT_STEP_LOG2, decode_mean, encode_update


def folded_twin(seed: bytes) -> bytes:
    """Another seed that Flower's generator cannot tell apart: its 32-bit XOR fold is the same."""
    words = bytearray(seed)
    for i in range(4):
        words[i] ^= 0xA5
        words[4 + i] ^= 0xA5
    return bytes(words)


def test_seeds_that_flower_folds_together_give_unrelated_masks() -> None:
    """Flower's `pseudo_rand_gen` folds a 32-byte seed into 32 bits for MT19937: 2^32 masks, and
    these two seeds give the same one. fedgate's masks use every bit of the seed."""
    seed = secrets.token_bytes(32)
    twin = folded_twin(seed)
    assert (pseudo_rand_gen(seed, 1 << 32, [(64,)])[0] == pseudo_rand_gen(twin, 1 << 32, [(64,)])[0]).all()
    ours, theirs = masks.private_mask(seed, 64), masks.private_mask(twin, 64)
    assert int(np.count_nonzero(ours == theirs)) == 0


def test_masks_are_deterministic_per_seed_and_differ_between_kinds() -> None:
    seed = secrets.token_bytes(32)
    assert masks.private_mask(seed, 1000)[:10].tolist() == masks.private_mask(seed, 10).tolist()
    import base64

    shared = base64.urlsafe_b64encode(seed)
    assert masks.pairwise_mask(shared, 10).tolist() != masks.private_mask(seed, 10).tolist()
    with pytest.raises(ValueError):
        masks.private_mask(seed[:16], 10)
    with pytest.raises(ValueError):
        masks.pairwise_mask(base64.urlsafe_b64encode(seed[:31]), 10)


def test_mask_bits_look_uniform() -> None:
    mask = masks.private_mask(secrets.token_bytes(32), 1 << 16)
    bits = np.unpackbits(mask.view(np.uint8))
    assert abs(bits.mean() - 0.5) < 5 * 0.5 / math.sqrt(bits.size)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(-(1 << 20), 1 << 20), min_size=6, max_size=6), min_size=2, max_size=6),
    st.integers(-24, -8),
)
def test_the_masked_sum_is_the_exact_sum_of_the_released_updates(units: list[list[int]], grid_log2: int) -> None:
    """Property: global + g·k released in float64, encoded, masked pairwise and summed mod 2^64 is
    g·sum(k) exactly (pairwise masks cancel, signed sums come back); the mean is that over n."""
    grid = math.ldexp(1.0, grid_log2)
    start = {"a": np.linspace(-1, 1, 6)}
    released = [{"a": start["a"] + grid * np.array(u, dtype=np.float64)} for u in units]
    vectors = [encode_update(start, r, grid_log2, DEFAULT_STEP_LOG2, len(units)) for r in released]
    keys = [secrets.token_bytes(32) for _ in units]
    total = np.zeros(6, dtype=np.uint64)
    for i, vector in enumerate(vectors):
        masked = vector.copy()
        for j in range(len(units)):
            if j != i:
                import base64

                pair = base64.urlsafe_b64encode(bytes(a ^ b for a, b in zip(keys[i], keys[j], strict=True)))
                masks.apply_pairwise(masked, i, j, masks.pairwise_mask(pair, 6))
        np.add(total, masked, out=total)
    (summed,) = decode_mean(total, 1, DEFAULT_STEP_LOG2, [np.zeros(6)])
    np.testing.assert_array_equal(summed, grid * np.sum(np.array(units, dtype=np.float64), axis=0))
    (mean,) = decode_mean(total, len(units), DEFAULT_STEP_LOG2, [start["a"]])
    expected = start["a"] + grid * np.mean(np.array(units, dtype=np.float64), axis=0)
    np.testing.assert_allclose(mean, expected, rtol=0, atol=4 * np.finfo(np.float64).eps * np.abs(expected).max())


def test_encoding_refuses_what_would_not_sum_to_the_released_update() -> None:
    start = {"w": np.zeros(4, dtype=np.float32)}
    with pytest.raises(GateRefusal, match="finer than the server's step"):
        encode_update(start, {"w": np.zeros(4, dtype=np.float32)}, -50, -40, 5)
    off_grid = {"w": np.full(4, 0.3 * 2.0**-10, dtype=np.float32)}
    with pytest.raises(GateRefusal, match="not on the grid"):
        encode_update(start, off_grid, -10, -40, 5)
    huge = {"w": np.full(4, 2.0**30, dtype=np.float32)}
    with pytest.raises(GateRefusal, match="too large"):
        encode_update(start, huge, 0, -40, 5)
    ints = {"w": np.zeros(4, dtype=np.float32), "n": np.array([7])}
    assert encode_update(ints, ints, -10, -40, 5).size == 4  # only float tensors are summed
