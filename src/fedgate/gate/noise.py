"""The gate's only source of noise: integer Gaussian noise from an AES-256-CTR keystream.

What it draws. `NoiseSource.integer_gaussian` fills a block with i.i.d. samples of
K = rint(s·Z), Z ~ N(0, 1): the *rounded Gaussian* of scale s, exactly (no tail cut, no
value out of reach, no floating-point gaps), as a pure function of (key, stream, block).
The gate adds K to an integer vector v (the update on a grid, see `gate.update`), and
v + rint(s·Z) = rint(v + s·Z) is a post-processing of the Gaussian mechanism on v.

How, and why it is exact. Box–Muller on keystream uniforms, each float result checked
against a proven error bound and recomputed in interval arithmetic when the check cannot
decide:
  - pair j of a block takes word w_U from the first half of the block's keystream and w_P
    from the second: U in [w_U, w_U + 1)·2^-64, psi in [w_P >> 12, (w_P >> 12) + 1)·2^-52,
    and the low 3 bits of w_P swap the pair and flip its signs (the full circle from an
    octant). r = s·sqrt(-2 ln U), phi = psi·pi/4, (Z1, Z2) = r·(sin phi, cos phi); sin is a
    Taylor polynomial (truncation < 2^-45 on [0, pi/4]), cos = sqrt(1 - sin^2) >= 1/sqrt(2).
  - over the whole cell of the true (infinitely precise) uniforms, the float y = s·Z is off
    by less than (|y| + s)·2^-40: relative errors from U's cell (w_U >= 2^40) and rounding,
    the log (assumed within 2^-45 relative; the kernel's own is within 2^-50, see below, and
    a test checks it against mpmath), the polynomial and the products stay below 2^-43; the
    rounding of U near 1 costs at most s·2^-53/sqrt(2E) <= s·2^-41 while r >= 2^-12
    (w_U < 2^64 - 2^39). Where rint(y) is farther than that from a half-integer, every point
    of the cell rounds alike, so K is the ideal rint(s·Z) of the true uniforms.
  - otherwise (about 4.5·s·2^-40 of the samples: ~2e-8 at the shipped policy's s = 5243, ~24
    per 11M-parameter reply at s = 2^19, i.e. z = 1; and the pairs with w_U outside those
    bounds, 2^-24) mpmath's interval arithmetic computes K over the cell, drawing 64 more
    bits of U and psi from the pair's own keystream until the enclosure rounds to one integer.

What the DP accounting may therefore assume: every coordinate of the noise is an independent
rounded Gaussian of scale s = sigma / g, so the released g·(v + K) is the Gaussian mechanism
N(0, sigma^2) on g·v followed by rounding, with ||g·v|| at most the effective norm that
`gate.update` reports. The assumptions are AES-256 as a pseudorandom function, the kernel's
log within 2^-45 relative, IEEE sqrt and mpmath's interval arithmetic: no additive delta for
the sampler (nothing is truncated) and no floating-point term in epsilon.

Speed. The float path of a block is one compiled kernel (`_draw_block`, numba, vectorised,
GIL released, so blocks run on every core). Its log is not libm's, which does not vectorise:
x = 2^e·m with m in [1/sqrt 2, sqrt 2) taken from the bits, log m = 2·atanh(t), t = (m-1)/(m+1),
|t| <= 0.1716, by the series up to t^19 (truncation < 2^-55 relative), plus e·ln 2 with
Cody–Waite's split ln 2 (e·ln2_hi exact). m - 1 is exact and t within 2^-52 relative, so log m
is within 1.6·2^-52; adding e·ln 2 at most triples that, since |e·ln 2 + log m| >= 0.346 when
e != 0 while |log m| <= 0.347: below 2^-50 relative for every U the float path uses. LLVM may
fuse a·b + c (one rounding instead of two), which only tightens these bounds. Same key, same
draws as the first, numpy implementation of this path (a test holds them equal). Compiled
once per process (`compile_kernels()`), from numba's on-disk cache when there is one
(`__pycache__` beside this file, or NUMBA_CACHE_DIR).

Streams. The main keystream of block b of stream t starts at counter block t·2^96 + b·2^64
(a block uses < 2^15 AES blocks); pair j's refinements read t·2^96 + b·2^64 + 2^63 + j·2^16 +
level. Blocks are independent, drawn on any thread in any order with the same result."""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NoReturn

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mpmath.ctx_iv import MPIntervalContext  # type: ignore[import-untyped]

from fedgate.errors import FedgateError

KEY_BYTES = 32
BLOCK = 1 << 16
"""Samples per keystream block: the unit of work of one thread and one cipher context."""
SAMPLER = "rounded-gaussian/box-muller/aes-256-ctr/exact"
"""The sampler's name, recorded in the evidence so that the accounting can say what it assumes."""

_HALF = BLOCK // 2  # pairs per block
_U_LOW = 1 << 40  # w_U below this: U's cell too wide for the float check (exact path)
_U_HIGH = (1 << 64) - (1 << 39)  # w_U from here: r < 2^-12, fl(U)'s rounding too coarse (exact path)
_RELATIVE = 2.0**-40  # the float path's error in y is below (|y| + s) 2^-40 (see above)
_MAX_LEVELS = 16  # 16 refinements of 64 bits each: reached with probability ~2^-1000
_TOP = np.uint64(1 << 63)
_ONE_BITS = np.uint64(0x3FF0000000000000)
_PI_4 = math.pi / 4
# Taylor coefficients of sin(x)/x in x^2 up to x^12: on [0, pi/4] the truncation is below
# (pi/4)^14 / (0.9 * 15!) < 2^-45 relative.
_SIN = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(7))[::-1]


class NoiseSourceSpent(FedgateError):
    """A noise source was asked for noise twice. Each reply needs its own
    `NoiseSource.from_os_entropy()`: the same noise on two replies cancels in their difference."""


_CONSTRUCT = object()


class NoiseSource:
    """A 256-bit AES key from the operating system's entropy, good for one reply.

    The only public constructor is `from_os_entropy()`: there is no seed argument, and no
    numpy generator can stand in for it. It cannot be copied or pickled (a copy would
    repeat the noise). It draws only between `claim()` (once: one source, one reply) and
    `retire()` (which drops the key, so that nobody holding the source after the reply left
    can recompute its noise and subtract it)."""

    __slots__ = ("__key", "__lock", "__state")

    def __init__(self, key: bytes, *, _construct: object = None) -> None:
        if _construct is not _CONSTRUCT:
            raise TypeError("use NoiseSource.from_os_entropy(): noise comes only from OS entropy")
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a noise key is {KEY_BYTES} bytes")
        self.__key: bytes | None = key
        self.__lock = threading.Lock()
        self.__state = "fresh"

    @classmethod
    def from_os_entropy(cls) -> NoiseSource:
        return cls(secrets.token_bytes(KEY_BYTES), _construct=_CONSTRUCT)

    @classmethod
    def _for_tests(cls, key: bytes) -> NoiseSource:
        """TEST ONLY: a source with a chosen key, so that tests can repeat a draw. Production
        code never calls this; the gate's noise comes from `from_os_entropy()`."""
        return cls(key, _construct=_CONSTRUCT)

    def claim(self) -> None:
        """Start the one reply this source serves; raises `NoiseSourceSpent` the second time."""
        with self.__lock:
            if self.__state != "fresh":
                raise NoiseSourceSpent("this noise source was already used for a reply; draw a fresh one")
            self.__state = "claimed"

    def retire(self) -> None:
        """End that reply: the key is dropped and no more noise can be drawn."""
        with self.__lock:
            self.__key = None
            self.__state = "retired"

    def __repr__(self) -> str:
        return "NoiseSource(<os entropy>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a NoiseSource cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("a NoiseSource cannot be copied")

    def __deepcopy__(self, memo: Any) -> NoReturn:
        raise TypeError("a NoiseSource cannot be copied")

    def _keystream(self, counter: int, out: bytearray | memoryview, zeros: bytes | memoryview) -> None:
        key = self.__key
        if self.__state != "claimed" or key is None:
            raise NoiseSourceSpent(f"noise is drawn only between claim() and retire(); this source is {self.__state}")
        encryptor = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
        encryptor.update_into(zeros, out)

    def integer_gaussian(self, stream: int, block: int, count: int, scale: float, out: np.ndarray) -> None:
        """Fill `out[:count]` (float64) with i.i.d. rint(N(0, scale^2)), integer-valued floats,
        `count` <= `BLOCK`. Sample i is a pure function of (key, stream, block, scale, i): the
        same for every count > i. Only while the source is claimed."""
        if not 0 <= count <= BLOCK or not 0 <= stream < 2**32 or not 0 <= block < 2**32:
            raise ValueError("stream, block or count out of range")
        if not (math.isfinite(scale) and 0.0 < scale < 2.0**40):
            raise ValueError(f"noise scale must be in (0, 2^40), got {scale}")
        if out.dtype != np.float64 or out.shape[0] < count:
            raise ValueError("out must be float64 with room for count samples")
        if count == 0:
            return
        # sample i of a block is component i // HALF of pair i % HALF, whatever `count` is
        pairs = min(count, _HALF)
        work = _workspace()
        counter = (stream << 96) | (block << 64)
        nbytes = pairs * 8
        keystream, zeros = memoryview(work.keystream), memoryview(work.zeros)[:nbytes]
        self._keystream(counter, keystream[:nbytes], zeros)
        self._keystream(counter + _HALF // 2, keystream[_HALF * 8 : _HALF * 8 + nbytes], zeros)
        direct = pairs == _HALF and out.shape[0] >= BLOCK and out.flags.c_contiguous and out.flags.writeable
        k = out if direct else work.k
        # read at call time: the tests widen them to force the exact path
        u_low, u_span = np.uint64(_U_LOW), np.uint64(_U_HIGH - _U_LOW)
        flagged = _kernel()(
            work.words, pairs, scale, _RELATIVE, u_low, u_span, k, work.flags, work.ints, work.floats, _NO_RADIUS
        )
        if flagged:
            w_u, w_p = work.words[:pairs], work.words[_HALF : _HALF + pairs]
            for index in np.flatnonzero(work.flags).tolist():
                component, j = divmod(index, _HALF)
                if j < pairs and index < count:
                    k[index] = self._exact(stream, block, j, (int(w_u[j]), int(w_p[j])), component, scale)
        if not direct:
            out[: min(count, _HALF)] = k[: min(count, _HALF)]
            if count > _HALF:
                out[_HALF:count] = k[_HALF:count]

    def _exact(self, stream: int, block: int, pair: int, words: tuple[int, int], component: int, scale: float) -> float:
        """K of one component by interval arithmetic over the cell of the true uniforms,
        refined with 64 more keystream bits of U and psi until the enclosure decides."""
        u_num, p_word = words
        p_num, control = p_word >> 12, p_word & 7
        exponent = 64
        for level in range(_MAX_LEVELS):
            decided = _exact_round(u_num, exponent, p_num, exponent - 12, control, component, scale)
            if decided is not None:
                return float(decided)
            counter = (stream << 96) | (block << 64) | (1 << 63) | (pair << 16) | level
            refine = bytearray(16)
            self._keystream(counter, refine, bytes(16))
            u_num = (u_num << 64) | int.from_bytes(refine[:8], "little")
            p_num = (p_num << 64) | int.from_bytes(refine[8:], "little")
            exponent += 64
        raise FedgateError("the exact Gaussian sampler did not converge (probability ~2^-1000)")


_IV_LOCK = threading.Lock()
_IV = MPIntervalContext()


def _exact_round(
    u_num: int, u_exp: int, p_num: int, p_exp: int, control: int, component: int, scale: float
) -> int | None:
    """rint(y) for every y = s·Z with U in [u_num, u_num + 1) 2^-u_exp and psi in
    [p_num, p_num + 1) 2^-p_exp, or None when that cell straddles a half-integer."""
    with _IV_LOCK:
        iv = _IV
        iv.prec = u_exp + 128
        energy = -iv.log(iv.mpf([u_num, u_num + 1]) * iv.mpf(2) ** (-u_exp))
        if energy.a < 0:  # U's cell touches 1: E >= 0 all the same
            energy = iv.mpf([0, energy.b])
        radius = iv.sqrt(2 * energy) * iv.mpf(scale)
        phi = iv.mpf([p_num, p_num + 1]) * iv.mpf(2) ** (-p_exp) * iv.pi / 4
        swap = bool(control & 1)
        use_cos = swap if component == 0 else not swap
        y = radius * (iv.cos(phi) if use_cos else iv.sin(phi))
        lo, hi = _fraction(y._mpi_[0]), _fraction(y._mpi_[1])
    if control >> (1 + component) & 1:
        lo, hi = -hi, -lo
    low, high = math.floor(lo + Fraction(1, 2)), math.floor(hi + Fraction(1, 2))
    return low if low == high else None


def _fraction(raw: tuple[int, int, int, int]) -> Fraction:
    sign, mantissa, exponent, _ = raw
    value = Fraction(mantissa) * (Fraction(2) ** exponent)
    return -value if sign else value


_CHUNK = 512  # pairs per pass of the kernel: its scratch stays in the L1 cache
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split (Cody–Waite, as fdlibm): e·_LN2_HI is exact for |e| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(1, 10))  # 2·atanh(t) = 2t(1 + t^2/3 + ... + t^18/19 + ...)
_SQRT2_BITS = np.uint64(0x3FF6A09E667F3BCD)  # the bits of sqrt(2) rounded
_MANTISSA = np.uint64((1 << 52) - 1)
_EXP_ONE = np.uint64(1 << 52)
_MAGIC52 = np.uint64(0x4330000000000000)  # the bits of 2^52: OR in k < 2^52, subtract 2^52, get float(k)
_MAGIC84 = np.uint64(0x4530000000000000)  # the bits of 2^84: the same for k·2^32
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO52, _TWO84 = 2.0**52, 2.0**84
_BIAS = 2.0**52 + 1023.0
_U0, _U1, _U2, _U4 = np.uint64(0), np.uint64(1), np.uint64(2), np.uint64(4)
_U12, _U32, _U52, _U61, _U62 = np.uint64(12), np.uint64(32), np.uint64(52), np.uint64(61), np.uint64(62)
_A1, _A2, _A3, _A4, _A5, _A6, _A7, _A8, _A9 = _ATANH
_S0, _S1, _S2, _S3, _S4, _S5, _S6 = _SIN


def _draw_block(
    words: np.ndarray,
    pairs: int,
    scale: float,
    relative: float,
    u_low: np.uint64,
    u_span: np.uint64,
    out: np.ndarray,
    flags: np.ndarray,
    ints: np.ndarray,
    floats: np.ndarray,
    radius: np.ndarray,
) -> int:
    """The float path of one block: out[j] and out[HALF + j] get rint of the pair's two
    components; flags[i] = 1 where sample i must be redone exactly. Returns the number flagged.

    Each inner loop touches few arrays so that LLVM vectorises it; floats is ints' float64
    view, the way to move bits between integers and floats (numba has no scalar bitcast).
    float(w) for a 64-bit w is (hi·2^32 + 2^84 - 2^84) + (lo + 2^52 - 2^52): two exact terms,
    one rounding, the same double as a direct conversion (AVX2 has no such instruction).
    `radius`, when it has room for `pairs`, receives each pair's r (for the tests)."""
    c = -2.0 * scale * scale
    flagged = 0
    hi, lo, psi, x_bits, a_bits, b_bits = ints[0], ints[1], ints[2], ints[3], ints[4], ints[5]
    hi_f, lo_f, psi_f, x, a, b, r = floats[0], floats[1], floats[2], floats[3], floats[4], floats[5], floats[6]
    for start in range(0, pairs, _CHUNK):
        n = min(_CHUNK, pairs - start)
        w_u = words[start : start + n]
        w_p = words[_HALF + start : _HALF + start + n]
        for i in range(n):
            hi[i] = _MAGIC84 | (w_u[i] >> _U32)
            lo[i] = _MAGIC52 | (w_u[i] & _LOW32)
        for i in range(n):
            psi[i] = _MAGIC52 | (w_p[i] >> _U12)
        for i in range(n):  # U = (w_U + 1/2)·2^-64, rounded as float(w_U) + 0.5
            x[i] = (((hi_f[i] - _TWO84) + (lo_f[i] - _TWO52)) + 0.5) * 2.0**-64
        for i in range(n):  # U = 2^e·m, m in [1/sqrt 2, sqrt 2): m's bits to lo, 2^52 + e + 1023 to hi
            bits = x_bits[i]
            m = (bits & _MANTISSA) | _ONE_BITS
            big = m > _SQRT2_BITS
            lo[i] = m - _EXP_ONE * big
            hi[i] = _MAGIC52 | ((bits >> _U52) + big)
        for i in range(n):  # r = s·sqrt(-2 ln U)
            m = lo_f[i]
            t = (m - 1.0) / (m + 1.0)
            t2 = t * t
            p = _A9
            p = p * t2 + _A8
            p = p * t2 + _A7
            p = p * t2 + _A6
            p = p * t2 + _A5
            p = p * t2 + _A4
            p = p * t2 + _A3
            p = p * t2 + _A2
            p = p * t2 + _A1
            log_m = 2.0 * t + 2.0 * t * (t2 * p)
            e = hi_f[i] - _BIAS
            r[i] = math.sqrt((e * _LN2_HI + (e * _LN2_LO + log_m)) * c)
        if radius.shape[0] >= pairs:
            for i in range(n):
                radius[start + i] = r[i]
        for i in range(n):  # phi = psi·pi/4; sin by Taylor (Horner in phi^2), cos = sqrt(1 - sin^2)
            phi = (psi_f[i] - _TWO52) * 2.0**-52
            phi *= _PI_4
            phi2 = phi * phi
            sin = phi2 * _S0
            sin += _S1
            sin *= phi2
            sin += _S2
            sin *= phi2
            sin += _S3
            sin *= phi2
            sin += _S4
            sin *= phi2
            sin += _S5
            sin *= phi2
            sin += _S6
            sin *= phi
            cos = math.sqrt(1.0 - sin * sin)
            a[i] = sin * r[i]
            b[i] = cos * r[i]
        for i in range(n):  # octant: bit 0 swaps, bits 1 and 2 flip the signs
            control = w_p[i]
            swap = (a_bits[i] ^ b_bits[i]) & (_U0 - (control & _U1))
            a_bits[i] = (a_bits[i] ^ swap) ^ ((control << _U62) & _TOP)
            b_bits[i] = (b_bits[i] ^ swap) ^ ((control << _U61) & _TOP)
        # rint, and the check that every point of the cell rounds alike: |y - rint(y)| must
        # stay below 1/2 - (|y| + s)·2^-40, with |y| <= r; and w_U inside [_U_LOW, _U_HIGH)
        out_a = out[start : start + n]
        out_b = out[_HALF + start : _HALF + start + n]
        flags_a = flags[start : start + n]
        flags_b = flags[_HALF + start : _HALF + start + n]
        for i in range(n):
            k = np.rint(a[i])
            out_a[i] = k
            flags_a[i] = abs(a[i] - k) >= 0.5 - (r[i] + scale) * relative
        for i in range(n):
            k = np.rint(b[i])
            out_b[i] = k
            flags_b[i] = abs(b[i] - k) >= 0.5 - (r[i] + scale) * relative
        for i in range(n):
            wide = (w_u[i] - u_low) >= u_span  # w_U outside [_U_LOW, _U_HIGH): one wrapping compare
            flags_a[i] |= wide
            flags_b[i] |= wide
        for i in range(n):
            flagged += flags_a[i] + flags_b[i]
    return flagged


_NO_RADIUS = np.empty(0)
_KERNEL_LOCK = threading.Lock()
_COMPILED: list[Callable[..., int]] = []


def _kernel() -> Callable[..., int]:
    if not _COMPILED:
        with _KERNEL_LOCK:
            if not _COMPILED:
                import numba  # type: ignore[import-untyped]  # imported here: only the gate needs it

                # "contract" lets LLVM fuse a·b + c into one rounding: every bound above assumes
                # at most one rounding per operation, so fusing only tightens them
                jit = numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"contract"})
                _COMPILED.append(jit(_draw_block))
    return _COMPILED[0]


def compile_kernels() -> None:
    """Compile (or load from numba's cache) the sampler's kernel now, so that the first
    reply does not pay for it. Draws nothing."""
    work = _workspace()
    _kernel()(work.words, 0, 1.0, _RELATIVE, np.uint64(_U_LOW), np.uint64(_U_HIGH - _U_LOW), work.k, work.flags,
              work.ints, work.floats, _NO_RADIUS)  # fmt: skip


class _Workspace:
    """Per-thread buffers for one block, reused across calls (no page faults per reply)."""

    def __init__(self) -> None:
        pairs = _HALF
        self.zeros = bytes(pairs * 8)
        self.keystream = bytearray(BLOCK * 8)
        self.words = np.frombuffer(self.keystream, dtype="<u8")
        self.k = np.empty(BLOCK)
        self.flags = np.zeros(BLOCK, dtype=np.uint8)
        self.ints = np.empty((7, _CHUNK), dtype=np.uint64)
        self.floats = self.ints.view(np.float64)


_LOCAL = threading.local()


def _workspace() -> _Workspace:
    work: _Workspace | None = getattr(_LOCAL, "work", None)
    if work is None:
        work = _LOCAL.work = _Workspace()
    return work


__all__ = ["BLOCK", "SAMPLER", "NoiseSource", "NoiseSourceSpent", "compile_kernels"]
