"""The gate's enforced guarantee on the update (reply - global model): clip to L2 norm C,
put it on a grid, add integer Gaussian noise; in blocks of coordinates, on every core.

The mechanism, integer-valued so that floating point cannot leak (Mironov 2012; Jin et al.
2021): u = clip(reply - global) with ||u|| <= C; v = rint(u / g) on the grid g (a power of
two, `grid_step`); K = rint(N(0, (sigma/g)^2)) per coordinate from `gate.noise`; the
released update is g·(v + K), exact in float64 (|v + K| < 2^52), then added to the global
model and cast to the declared dtype: post-processing of public values.

Rounding moves each coordinate by at most g/2, so ||g·v|| <= C·(1 + 2^-30) + g·sqrt(d)/2
=: the *effective norm* (the 2^-30 covers float error in the norm and the scaling): this is
the sensitivity (and the channel's power) the bound uses, `capacity_bits(effective_norm, sigma)`.
Two neighbouring replies differ by at most twice it. `grid_step` keeps g·sqrt(d)/2 <= C·2^-8,
so the bound is at most (1 + 2^-8)^2 - 1 = 0.79 % above C^2 / (2 sigma^2 ln 2) for any d and any
noise multiplier, and g <= sigma·2^-8, so the grid is far below the noise. What the DP
accounting assumes about the sampler is in `gate.noise` (exactly rounded Gaussian noise).

Speed: two passes over the tensors, each one compiled kernel per block (numba, GIL released,
on every core): the norm (float64 accumulators, no float64 copy of anything) and the release
(difference, scale, rint, + K, · g, + global, cast: one read of each input, one write). float16
tensors, which numba cannot compute on, take the same arithmetic through numpy."""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgate.canonical import decimal_str
from fedgate.errors import GateRefusal
from fedgate.gate.noise import BLOCK, SAMPLER, NoiseSource, NoiseSourceSpent
from fedgate.gate.noise import compile_kernels as compile_noise_kernel

NORM_SLACK = 2.0**-30
"""Relative slack on the clip norm for float error in the computed norm and the scaling
(the error is below (BLOCK + blocks + 4)·2^-53 < 2^-35)."""
_EXACT_LIMIT = 2.0**52  # |v + K| below this: every step of the mechanism is exact in float64
_OVERFLOW_SCALE = 2.0**-600  # differences of huge float64 tensors are taken at this scale


def grid_step(sigma: float, clip_norm: float, coordinates: int) -> float:
    """The largest power of two g <= min(sigma·2^-8, C·2^-7 / sqrt(d)): the grid adds at most
    C·2^-8 to the sensitivity and lies 256 times below the noise. 0 when there is no noise."""
    if sigma == 0.0:
        return 0.0
    limit = sigma * 2.0**-8
    if coordinates > 0:
        limit = min(limit, clip_norm * 2.0**-7 / math.sqrt(coordinates))
    step = 2.0 ** math.floor(math.log2(limit))
    if step < 2.0**-1000:
        raise ValueError(f"sigma {sigma} and clip norm {clip_norm} are too small for an exact grid")
    return step


def effective_norm(clip_norm: float, grid: float, coordinates: int) -> float:
    """The largest L2 norm the released, grid-rounded update can have before noise."""
    return clip_norm * (1.0 + NORM_SLACK) + grid * math.sqrt(coordinates) / 2.0


def capacity_bits(clip_norm: float, sigma: float) -> float:
    """Upper bound on the information a clipped, noised update carries: the Gaussian channel
    with total power C^2 spread over any number of coordinates, each with noise sigma^2,
    carries at most sum 1/2 log2(1 + P_i/sigma^2) <= C^2 / (2 sigma^2 ln 2) bits.
    Pass the effective norm (`NoisedUpdate.evidence.effective_norm`), not the policy's C."""
    if sigma == 0.0:
        return math.inf
    return clip_norm**2 / (2.0 * sigma**2 * math.log(2.0))


def l2_norm(tensors: Mapping[str, np.ndarray] | Iterable[np.ndarray]) -> float:
    """L2 norm over all tensors together, accumulated in float64 block by block (no float64
    copy of a whole tensor)."""
    arrays = tensors.values() if isinstance(tensors, Mapping) else tensors
    partials: list[float] = []
    for array in arrays:
        flat = np.ravel(array)
        for start in range(0, flat.size, BLOCK):
            chunk = flat[start : start + BLOCK].astype(np.float64)
            partials.append(float(np.dot(chunk, chunk)))
    return math.sqrt(math.fsum(partials))


@dataclass(frozen=True)
class UpdateEvidence:
    """What the clip and noise stage did, for the ledger (floats as decimal strings)."""

    norm: float
    scale: float
    clipped: bool
    clip_norm: float
    sigma: float
    grid_step: float
    effective_norm: float
    update_bits: float
    coordinates: int
    sampler: str

    def to_json(self) -> dict[str, Any]:
        return {
            "norm": decimal_str(self.norm),
            "scale": decimal_str(self.scale),
            "clipped": self.clipped,
            "clip_norm": decimal_str(self.clip_norm),
            "sigma": decimal_str(self.sigma),
            "grid_step": decimal_str(self.grid_step),
            "grid_step_log2": math.frexp(self.grid_step)[1] - 1 if self.grid_step else None,
            "effective_norm": decimal_str(self.effective_norm),
            "update_bits": decimal_str(self.update_bits),
            "coordinates": self.coordinates,
            "sampler": self.sampler if self.sigma > 0 else "none",
        }


@dataclass(frozen=True)
class NoisedUpdate:
    """The outgoing float tensors (new, C-contiguous, read-only, in the declared dtypes, in
    the order given) and the evidence of how they were made."""

    arrays: tuple[np.ndarray, ...]
    evidence: UpdateEvidence

    def to_json(self) -> dict[str, Any]:
        return self.evidence.to_json()


class PredrawnNoise:
    """The integer noise K of one reply, drawn before the reply exists (issue 15).

    K depends on the noise source, the number of float coordinates and the policy's C and
    sigma, never on the reply, so the gate starts drawing it when it admits the instruction,
    on threads, while the ClientApp runs (sandboxed: it cannot read the gate's memory). On a
    hospital whose GPU trains, the CPU is idle then, and the reply's path keeps only the norm
    and the release. The same blocks of the same stream as `noised_update` draws itself, so
    the result is the same for the same source. Serves one reply (`take` once); the source is
    retired when the drawing ends."""

    def __init__(
        self, coordinates: int, clip_norm: float, sigma: float, source: NoiseSource, threads: int | None = None
    ) -> None:
        _check_clip_and_sigma(clip_norm, sigma)
        self.coordinates, self.clip_norm, self.sigma = coordinates, clip_norm, sigma
        self.grid = grid_step(sigma, clip_norm, coordinates)
        self._draws: np.ndarray | None = np.empty(coordinates if self.grid else 0)
        self._error: BaseException | None = None
        self._taken = False
        source.claim()  # here, not in the thread: a spent source fails the admission itself
        self._thread = threading.Thread(
            target=self._draw, args=(source, threads or _default_threads()), name="fedgate-noise-draw", daemon=True
        )
        self._thread.start()

    def _draw(self, source: NoiseSource, workers: int) -> None:
        try:
            draws = self._draws
            if self.grid and draws is not None:
                scale = self.sigma / self.grid

                def draw(task: _Task) -> None:
                    start = task.block * BLOCK
                    source.integer_gaussian(0, task.block, task.size, scale, draws[start : start + task.size])

                _run(_tasks([self.coordinates]), workers, draw)
        except BaseException as err:  # re-raised by `take`, on the reply's path
            self._error = err
        finally:
            source.retire()

    def wait(self) -> None:
        """Until the drawing has ended (`take` waits by itself)."""
        self._thread.join()

    def discard(self) -> None:
        """The reply was concluded, sent or not: the draws go (nothing can take them after)."""
        self._thread.join()
        self._taken = True
        self._draws = None

    def take(self, coordinates: int, clip_norm: float, sigma: float) -> np.ndarray:
        """The draws (float64, integer-valued; empty without a grid), once, for a reply with
        these parameters; raises NoiseSourceSpent the second time, ValueError on a mismatch."""
        if self._taken:
            raise NoiseSourceSpent("this predrawn noise already served a reply")
        self._taken = True
        if (coordinates, clip_norm, sigma) != (self.coordinates, self.clip_norm, self.sigma):
            raise ValueError("the predrawn noise was drawn for another model or policy")
        self._thread.join()
        draws, self._draws = self._draws, None
        if self._error is not None:
            raise self._error
        assert draws is not None
        return draws


@dataclass(frozen=True)
class _Segment:
    tensor: int
    start: int  # in the tensor
    stop: int
    offset: int  # in the block


@dataclass(frozen=True)
class _Task:
    """Block `block` of the float coordinates, all tensors laid end to end: the unit of work
    of a thread and of one noise draw (tensor boundaries do not cost a draw each)."""

    block: int
    size: int
    segments: tuple[_Segment, ...]


def _tasks(sizes: Sequence[int]) -> list[_Task]:
    tasks: list[_Task] = []
    segments: list[_Segment] = []
    filled = 0
    for tensor, size in enumerate(sizes):
        start = 0
        while start < size:
            take = min(size - start, BLOCK - filled)
            segments.append(_Segment(tensor, start, start + take, filled))
            start += take
            filled += take
            if filled == BLOCK:
                tasks.append(_Task(len(tasks), filled, tuple(segments)))
                segments, filled = [], 0
    if filled:
        tasks.append(_Task(len(tasks), filled, tuple(segments)))
    return tasks


def noised_update(
    global_arrays: Sequence[np.ndarray],
    reply_arrays: Sequence[np.ndarray],
    clip_norm: float,
    sigma: float,
    source: NoiseSource | PredrawnNoise,
    *,
    names: Sequence[str] = (),
    threads: int | None = None,
    out: Sequence[np.ndarray] | None = None,
) -> NoisedUpdate:
    """global + g·(rint(clip(reply - global) / g) + K), cast to each tensor's dtype.

    `out`: where to write the result (writable, C-contiguous, the globals' shapes and dtypes,
    sharing no memory with the inputs), e.g. the outgoing message's own buffer; new arrays
    when None. Either way the returned arrays are read-only.

    The inputs are float tensors (float16/32/64) of equal shapes and dtypes, pairwise; they
    are only read. `source` serves this reply only: claimed here, retired on return (or its
    noise was drawn already: `PredrawnNoise`, taken here). A reply
    or global tensor holding NaN or Inf is refused (`GateRefusal("non-finite")`, naming
    `names[i]` if given).
    The float coordinates, laid end to end, are worked in blocks of `BLOCK` over `threads`
    threads (default: the cores this process may use); block b draws noise block b of stream
    0 of `source`. The result does not depend on the number of threads."""
    if len(global_arrays) != len(reply_arrays):
        raise ValueError("global and reply must have the same tensors")
    for index, (base, reply) in enumerate(zip(global_arrays, reply_arrays, strict=True)):
        if base.shape != reply.shape or base.dtype != reply.dtype or base.dtype.kind != "f":
            raise ValueError(f"tensor {index}: global {base.dtype}{base.shape} and reply {reply.dtype}{reply.shape}")
    _check_clip_and_sigma(clip_norm, sigma)
    if out is not None:
        _check_out(out, global_arrays, reply_arrays)
    if isinstance(source, PredrawnNoise):
        draws = source.take(sum(a.size for a in global_arrays), clip_norm, sigma)
        return _noised_update(global_arrays, reply_arrays, clip_norm, sigma, draws, names, threads, out)
    source.claim()
    try:
        return _noised_update(global_arrays, reply_arrays, clip_norm, sigma, source, names, threads, out)
    finally:
        source.retire()


def _noised_update(
    global_arrays: Sequence[np.ndarray],
    reply_arrays: Sequence[np.ndarray],
    clip_norm: float,
    sigma: float,
    source: NoiseSource | np.ndarray,
    names: Sequence[str],
    threads: int | None,
    out: Sequence[np.ndarray] | None,
) -> NoisedUpdate:
    """`source`: the source to draw from, block by block, or every draw already made."""
    bases = [np.ravel(a) for a in global_arrays]
    replies = [np.ravel(a) for a in reply_arrays]
    coordinates = sum(a.size for a in bases)
    grid = grid_step(sigma, clip_norm, coordinates)
    bound_norm = effective_norm(clip_norm, grid, coordinates)
    noise_scale = sigma / grid if grid else 0.0  # exact: grid is a power of two
    if grid and bound_norm / grid + 64.0 * noise_scale >= _EXACT_LIMIT:
        raise ValueError("the grid is too fine for exact float64 arithmetic at this clip norm and sigma")
    tasks = _tasks([a.size for a in bases])
    workers = threads or _default_threads()

    prescale = 1.0
    squares = _run(tasks, workers, lambda task: _block_squares(bases, replies, task, prescale))
    total = math.fsum(squares)
    if not math.isfinite(total):
        _refuse_non_finite(global_arrays, reply_arrays, names)
        prescale = _OVERFLOW_SCALE  # finite tensors whose difference overflows: redo at a small scale
        total = math.fsum(_run(tasks, workers, lambda task: _block_squares(bases, replies, task, prescale)))
    norm = math.sqrt(total) / prescale
    scale = 1.0 if norm <= clip_norm else clip_norm / norm

    outputs = list(out) if out is not None else [np.empty(a.shape, dtype=a.dtype) for a in global_arrays]
    flat_out = [a.reshape(-1) for a in outputs]  # views: the arrays are C-contiguous (checked)
    factor = scale / prescale / grid if grid else scale / prescale
    _run(
        tasks,
        workers,
        lambda task: _block_release(bases, replies, flat_out, task, prescale, factor, grid, noise_scale, source),
    )
    for array in outputs:
        array.flags.writeable = False
    evidence = UpdateEvidence(
        norm=norm,
        scale=scale,
        clipped=scale < 1.0,
        clip_norm=clip_norm,
        sigma=sigma,
        grid_step=grid,
        effective_norm=bound_norm,
        update_bits=capacity_bits(bound_norm, sigma),
        coordinates=coordinates,
        sampler=SAMPLER,
    )
    return NoisedUpdate(tuple(outputs), evidence)


def _check_clip_and_sigma(clip_norm: float, sigma: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0.0 and math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(f"clip norm must be > 0 and sigma >= 0, got {clip_norm}, {sigma}")


def _check_out(
    out: Sequence[np.ndarray], global_arrays: Sequence[np.ndarray], reply_arrays: Sequence[np.ndarray]
) -> None:
    if len(out) != len(global_arrays):
        raise ValueError("out must have one array per tensor")
    for index, (target, base) in enumerate(zip(out, global_arrays, strict=True)):
        if target.shape != base.shape or target.dtype != base.dtype:
            raise ValueError(f"out {index}: {target.dtype}{target.shape}, the tensor is {base.dtype}{base.shape}")
        if not (target.flags.writeable and target.flags.c_contiguous):
            raise ValueError(f"out {index} must be writable and C-contiguous")
        if any(np.may_share_memory(target, source) for source in (*global_arrays, *reply_arrays)):
            raise ValueError(f"out {index} overlaps an input")  # the kernels read each input once


def _segment_squares(reply: np.ndarray, base: np.ndarray, prescale: float) -> float:
    """sum((reply·prescale - global·prescale)^2) in float64; inf or nan when it is not finite."""
    if reply.dtype != np.float16:
        return float(_kernels()[0](reply, base, prescale))
    difference = np.empty(reply.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite sum is handled by the caller
        np.multiply(reply, prescale, out=difference, dtype=np.float64)
        difference -= np.multiply(base, prescale, dtype=np.float64)
        return float(np.dot(difference, difference))


def _block_squares(bases: list[np.ndarray], replies: list[np.ndarray], task: _Task, prescale: float) -> float:
    total = 0.0
    for segment in task.segments:
        base = bases[segment.tensor][segment.start : segment.stop]
        reply = replies[segment.tensor][segment.start : segment.stop]
        total += _segment_squares(reply, base, prescale)
    return total


def _block_release(
    bases: list[np.ndarray],
    replies: list[np.ndarray],
    outputs: list[np.ndarray],
    task: _Task,
    prescale: float,
    factor: float,
    grid: float,
    noise_scale: float,
    source: NoiseSource | np.ndarray,
) -> None:
    """For each coordinate of the block: global + g·(rint((reply - global)·factor) + K), or
    global + (reply - global)·factor without a grid, in float64, cast to the tensor's dtype.
    K is drawn here from `source`, or read from it when it holds every draw."""
    draws = _NO_NOISE
    if not grid:
        pass
    elif isinstance(source, NoiseSource):
        draws = _buffers().noise
        source.integer_gaussian(0, task.block, task.size, noise_scale, draws)
    else:
        draws = source[task.block * BLOCK : task.block * BLOCK + task.size]
    for segment in task.segments:
        base = bases[segment.tensor][segment.start : segment.stop]
        reply = replies[segment.tensor][segment.start : segment.stop]
        out = outputs[segment.tensor][segment.start : segment.stop]
        if reply.dtype != np.float16:
            _kernels()[1](reply, base, out, draws, segment.offset, prescale, factor, grid)
            continue
        values = np.multiply(reply, prescale, dtype=np.float64)
        values -= np.multiply(base, prescale, dtype=np.float64)
        values *= factor
        if grid:
            np.rint(values, out=values)
            values += draws[segment.offset : segment.offset + values.size]
            values *= grid
        np.add(values, base, out=out, casting="same_kind")


def _squares_kernel(reply: np.ndarray, base: np.ndarray, prescale: float) -> float:
    """Four float64 accumulators (so that the loop vectorises without reassociation); the
    error stays below BLOCK·2^-53 relative (`NORM_SLACK`)."""
    n = reply.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    i = 0
    while i + 4 <= n:
        d0 = np.float64(reply[i]) * prescale - np.float64(base[i]) * prescale
        d1 = np.float64(reply[i + 1]) * prescale - np.float64(base[i + 1]) * prescale
        d2 = np.float64(reply[i + 2]) * prescale - np.float64(base[i + 2]) * prescale
        d3 = np.float64(reply[i + 3]) * prescale - np.float64(base[i + 3]) * prescale
        s0 += d0 * d0
        s1 += d1 * d1
        s2 += d2 * d2
        s3 += d3 * d3
        i += 4
    while i < n:
        d = np.float64(reply[i]) * prescale - np.float64(base[i]) * prescale
        s0 += d * d
        i += 1
    return (s0 + s1) + (s2 + s3)


def _release_kernel(
    reply: np.ndarray,
    base: np.ndarray,
    out: np.ndarray,
    noise: np.ndarray,
    offset: int,
    prescale: float,
    factor: float,
    grid: float,
) -> None:
    n = reply.shape[0]
    if grid != 0.0:
        for i in range(n):
            b = np.float64(base[i])
            v = (np.float64(reply[i]) * prescale - b * prescale) * factor
            out[i] = (np.rint(v) + noise[offset + i]) * grid + b  # (v + K)·g is exact: integers below 2^52
    else:
        for i in range(n):
            b = np.float64(base[i])
            out[i] = (np.float64(reply[i]) * prescale - b * prescale) * factor + b


_KERNEL_LOCK = threading.Lock()
_COMPILED: list[tuple[Callable[..., float], Callable[..., None]]] = []


def _kernels() -> tuple[Callable[..., float], Callable[..., None]]:
    if not _COMPILED:
        with _KERNEL_LOCK:
            if not _COMPILED:
                import numba  # type: ignore[import-untyped]  # imported here: only the gate needs it

                jit = numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
                _COMPILED.append((jit(_squares_kernel), jit(_release_kernel)))
    return _COMPILED[0]


def compile_kernels() -> None:
    """Compile (or load from numba's cache) every kernel of the stage for float32 and float64
    tensors as the gate passes them (read-only views in, new arrays out), so that the first
    reply of a process does not pay for it. Draws no noise."""
    compile_noise_kernel()
    squares, release = _kernels()
    for dtype in (np.float32, np.float64):
        view = np.zeros(4, dtype=dtype)
        view.flags.writeable = False
        for reply in (view, np.zeros(4, dtype=dtype)):
            squares(reply, view, 1.0)
            release(reply, view, np.empty(4, dtype=dtype), _NO_NOISE, 0, 1.0, 1.0, 0.0)


def _refuse_non_finite(
    global_arrays: Sequence[np.ndarray], reply_arrays: Sequence[np.ndarray], names: Sequence[str]
) -> None:
    for side, arrays in (("reply", reply_arrays), ("global model", global_arrays)):
        for index, array in enumerate(arrays):
            if not np.isfinite(array).all():
                name = names[index] if index < len(names) else f"#{index}"
                raise GateRefusal("non-finite", f"{side} tensor {name!r} holds NaN or Inf", key=name)


class _Buffers:
    def __init__(self) -> None:
        self.noise = np.empty(BLOCK)


_NO_NOISE = np.empty(0)  # where there is no grid the kernel reads no noise


_LOCAL = threading.local()


def _buffers() -> _Buffers:
    buffers: _Buffers | None = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = _Buffers()
    return buffers


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def _run(tasks: list[_Task], workers: int, work: Callable[[_Task], Any]) -> list[Any]:
    """work(task) for every task, `workers` threads pulling the next task as they free up
    (a busy core does not hold the others back). Results in task order."""
    results: list[Any] = [None] * len(tasks)
    if workers <= 1 or len(tasks) <= 1:
        for index, task in enumerate(tasks):
            results[index] = work(task)
        return results
    counter = itertools.count()

    def loop() -> None:
        while (index := next(counter)) < len(tasks):
            results[index] = work(tasks[index])

    with _POOL_LOCK:
        pool = _POOLS.get(workers) or _POOLS.setdefault(workers, ThreadPoolExecutor(workers - 1, "fedgate-noise"))
    futures = [pool.submit(loop) for _ in range(workers - 1)]
    try:
        loop()  # the calling thread works too
    finally:
        for future in futures:
            future.exception()  # wait for every worker before the caller moves on (or retires the source)
    for future in futures:
        future.result()
    return results


__all__ = [
    "NORM_SLACK",
    "NoisedUpdate",
    "PredrawnNoise",
    "UpdateEvidence",
    "capacity_bits",
    "compile_kernels",
    "effective_norm",
    "grid_step",
    "l2_norm",
    "noised_update",
]
