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
    numpy's log (assumed within 2^-45 relative, about 256 ulp; glibc's is within 1 ulp; a
    test checks this platform), the polynomial and the products stay below 2^-43; the
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
`gate.update` reports. The assumptions are AES-256 as a pseudorandom function, numpy's log
within 2^-45 relative, IEEE sqrt and mpmath's interval arithmetic: no additive delta for the
sampler (nothing is truncated) and no floating-point term in epsilon.

Streams. The main keystream of block b of stream t starts at counter block t·2^96 + b·2^64
(a block uses < 2^15 AES blocks); pair j's refinements read t·2^96 + b·2^64 + 2^63 + j·2^16 +
level. Blocks are independent, drawn on any thread in any order with the same result."""

from __future__ import annotations

import math
import secrets
import threading
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
        words = np.frombuffer(work.keystream, dtype="<u8")
        w_u, w_p = words[:pairs], words[_HALF : _HALF + pairs]
        w_c = w_p  # the low 3 bits of w_P: swap and signs; its top 52 bits: psi
        z = work.z[: 2 * pairs]
        first, second = z[:pairs], z[pairs:]
        r, y, u64, flag = work.r[:pairs], work.y[:pairs], work.u64[:pairs], work.flag[:pairs]

        # radius: U = (w_U + 1/2) 2^-64 in (0, 1], r = s sqrt(-2 ln U)
        np.copyto(r, w_u, casting="unsafe")
        r += 0.5
        r *= 2.0**-64
        np.log(r, out=r)
        r *= -2.0 * scale * scale
        np.sqrt(r, out=r)

        # angle: phi = psi pi/4 in [0, pi/4); sin by Taylor (Horner in phi^2), cos = sqrt(1 - sin^2)
        phi_bits = y.view(np.uint64)
        np.right_shift(w_p, np.uint64(12), out=phi_bits)
        phi_bits |= _ONE_BITS  # a float in [1, 2) whose mantissa is psi's 52 bits
        y -= 1.0
        y *= _PI_4  # phi
        np.multiply(y, y, out=second)  # phi^2
        np.multiply(second, _SIN[0], out=first)
        for coefficient in _SIN[1:-1]:
            first += coefficient
            first *= second
        first += _SIN[-1]
        first *= y  # sin(phi)
        np.multiply(first, first, out=second)
        np.subtract(1.0, second, out=second)
        np.sqrt(second, out=second)  # cos(phi); 1 - sin^2 >= 1/2 here, so no cancellation
        first *= r
        second *= r

        # octant: bit 0 swaps (first, second), bits 1 and 2 flip their signs; on the bit patterns
        first_bits, second_bits, bits = first.view(np.uint64), second.view(np.uint64), work.u64b[:pairs]
        np.bitwise_and(w_c, np.uint64(1), out=u64)
        np.negative(u64, out=u64)  # all ones where the swap bit is set
        np.bitwise_xor(first_bits, second_bits, out=bits)
        bits &= u64
        first_bits ^= bits
        second_bits ^= bits
        np.left_shift(w_c, np.uint64(62), out=bits)
        bits &= _TOP
        first_bits ^= bits
        np.left_shift(w_c, np.uint64(61), out=bits)
        bits &= _TOP
        second_bits ^= bits

        # rint, and the check that every point of the cell rounds alike: |y - rint(y)| must stay
        # below 1/2 - (|y| + s) 2^-40, and |y| <= r (the pair's radius)
        span = 2 * pairs
        direct = pairs == _HALF and out.shape[0] >= BLOCK
        k = out[:span] if direct else work.k[:span]
        np.rint(z, out=k)
        z -= k
        np.abs(z, out=z)
        r += scale
        r *= _RELATIVE
        np.subtract(0.5, r, out=r)  # the smallest distance to 1/2 this pair may have
        ambiguous = work.ambiguous[:span]
        np.greater_equal(first, r, out=ambiguous[:pairs])
        np.greater_equal(second, r, out=ambiguous[pairs:])
        wide = flag  # w_U outside [_U_LOW, _U_HIGH): one unsigned compare after a wrapping shift
        np.subtract(w_u, np.uint64(_U_LOW), out=u64)
        np.greater_equal(u64, np.uint64(_U_HIGH - _U_LOW), out=wide)
        if ambiguous.any() or wide.any():
            for j in np.flatnonzero(ambiguous[:pairs] | ambiguous[pairs:] | wide).tolist():
                for component in (0, 1):
                    index = component * pairs + j
                    if component * _HALF + j < count and (ambiguous[index] or wide[j]):
                        pair_words = (int(w_u[j]), int(w_p[j]))
                        k[index] = self._exact(stream, block, j, pair_words, component, scale)
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


class _Workspace:
    """Per-thread buffers for one block, reused across calls (no page faults per reply)."""

    def __init__(self) -> None:
        pairs = _HALF
        self.zeros = bytes(pairs * 8)
        self.keystream = bytearray(BLOCK * 8)
        self.z = np.empty(BLOCK)
        self.k = np.empty(BLOCK)
        self.margin = np.empty(BLOCK)
        self.ambiguous = np.empty(BLOCK, dtype=bool)
        self.r = np.empty(pairs)
        self.y = np.empty(pairs)
        self.u64 = np.empty(pairs, dtype=np.uint64)
        self.u64b = np.empty(pairs, dtype=np.uint64)
        self.flag = np.empty(pairs, dtype=bool)


_LOCAL = threading.local()


def _workspace() -> _Workspace:
    work: _Workspace | None = getattr(_LOCAL, "work", None)
    if work is None:
        work = _LOCAL.work = _Workspace()
    return work


__all__ = ["BLOCK", "SAMPLER", "NoiseSource", "NoiseSourceSpent"]
