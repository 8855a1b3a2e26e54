"""What a hospital sums into the aggregate, as integers mod 2^64, and how the server reads the sum.

The gate releases global + g·(v + K): the clipped update on its grid g (a power of two) plus
integer Gaussian noise (`gate.update`), cast to the model's dtypes. The masked vector carries
exactly g·(v + K), in units of the server's step s = 2^step_log2 (a power of two no coarser than
g), so the sum of the survivors' vectors is the exact sum of their released updates: no
rounding after the noise, nothing nonlinear between the noise and the sum (which the
distributed-noise accounting needs: it treats the sum's noise as the sum of each hospital's).

    gate:    x = rint((released - global) / g) · (g / s)         int64, |x| <= LIMIT / sample_num
    server:  mean = (sum x mod 2^64, as int64) · s / survivors;  model = global + mean

Every hospital's update weighs the same in the sum. A sum weighted by num_examples would hand
a large hospital's update to the server with less noise, relative to its weight, than the
accounting assumes (the noise of the others is scaled down with their smaller weights), so
the aggregate is the unweighted mean of the survivors' gated updates: FedAvg with equal weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedgate.errors import GateRefusal

MODULUS_BITS = 64
STEP_LOG2_RANGE = (-60, 0)
"""The server's step s = 2^step_log2 must lie in this range (fedgate's workflow uses 2^-40)."""
DEFAULT_STEP_LOG2 = -40
LIMIT = (1 << 63) - 1  # |sum| below this: the signed sum mod 2^64 is the exact sum


def float_names(model: Mapping[str, np.ndarray]) -> list[str]:
    """The tensors that are summed: the float ones, in the model's order (others stay the server's)."""
    return [name for name, value in model.items() if value.dtype.kind == "f"]


def coordinates(model: Mapping[str, np.ndarray]) -> int:
    return sum(int(model[name].size) for name in float_names(model))


def encode_update(
    global_model: Mapping[str, np.ndarray],
    released: Mapping[str, np.ndarray],
    grid_log2: int | None,
    step_log2: int,
    sample_num: int,
) -> np.ndarray:
    """The released update g·(v + K) in units of 2^step_log2, as uint64 (two's complement).

    `grid_log2` is the gate's grid (None: no noise, no grid: the update is rounded to the
    step). Refuses (GateRefusal "secagg-encoding") rather than send a vector that would not
    sum to the released updates: a grid finer than the server's step, float rounding that
    hides the grid, or values so large the sum could wrap."""
    if not STEP_LOG2_RANGE[0] <= step_log2 <= STEP_LOG2_RANGE[1]:
        raise GateRefusal("secagg-encoding", f"the server's step 2^{step_log2} is out of range")
    if grid_log2 is not None and grid_log2 < step_log2:
        raise GateRefusal(
            "secagg-encoding",
            f"this hospital's noise grid 2^{grid_log2} is finer than the server's step 2^{step_log2}",
        )
    limit = float(LIMIT // max(sample_num, 1))
    step = math.ldexp(1.0, step_log2)
    parts: list[np.ndarray] = []
    for name in float_names(global_model):
        difference = (
            np.asarray(released[name], dtype=np.float64).ravel()
            - np.asarray(global_model[name], dtype=np.float64).ravel()
        )
        if grid_log2 is None:
            units = np.rint(difference / step)
        else:
            grid = math.ldexp(1.0, grid_log2)
            on_grid = np.rint(difference / grid)
            error = np.abs(difference - on_grid * grid)
            if error.size and float(error.max()) > grid / 4:
                raise GateRefusal(
                    "secagg-encoding",
                    f"tensor {name!r}: the released update is not on the grid 2^{grid_log2} "
                    f"(off by {float(error.max()):.3g}; the model's dtype is too coarse for it)",
                    key=name,
                )
            units = on_grid * math.ldexp(1.0, grid_log2 - step_log2)  # exact: a power of two
        if units.size and float(np.abs(units).max()) > limit:
            raise GateRefusal("secagg-encoding", f"tensor {name!r} is too large to sum without wrapping", key=name)
        parts.append(units.astype(np.int64))
    vector = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return vector.view(np.uint64)


def decode_mean(
    total: np.ndarray, survivors: int, step_log2: int, global_model: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The new model from the unmasked sum: global + sum·s / survivors for each float tensor (in
    its own dtype); every other tensor as the server had it."""
    if survivors < 1:
        raise ValueError("no survivors to average")
    signed = np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64)
    mean = signed * (math.ldexp(1.0, step_log2) / survivors)
    out: list[np.ndarray] = []
    offset = 0
    for tensor in global_model:
        if tensor.dtype.kind != "f":
            out.append(np.array(tensor, copy=True))
            continue
        size = int(tensor.size)
        updated = np.asarray(tensor, dtype=np.float64) + mean[offset : offset + size].reshape(tensor.shape)
        out.append(updated.astype(tensor.dtype))
        offset += size
    if offset != mean.size:
        raise ValueError(f"the sum has {mean.size} coordinates, the model {offset}")
    return out


__all__ = ["DEFAULT_STEP_LOG2", "MODULUS_BITS", "coordinates", "decode_mean", "encode_update", "float_names"]
