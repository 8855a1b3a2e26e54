"""The masks of fedgate's SecAgg+: uniform vectors mod 2^64 from ChaCha20 keyed by a 256-bit seed.

Flower's SecAgg+ folds its 32-byte seeds by XOR into a 32-bit seed for numpy's MT19937: 2^32
possible masks, so a server that tries them all strips any mask off a masked vector, and
MT19937 is predictable from its output anyway. Here every mask is the ChaCha20 keystream under
the full 32-byte seed, read as little-endian uint64 words: a masked vector x + m mod 2^64 is
uniform and independent of x for anyone without the seed (ChaCha20 as a PRF).

Seeds: a hospital's private mask from 32 bytes of OS entropy; a pairwise mask from the 32 bytes
of HKDF-SHA256 over the pair's ECDH secret (Flower's `generate_shared_key`, base64url-decoded).
The two kinds use different nonces, so no seed ever keys two streams."""

from __future__ import annotations

import base64
import binascii
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
PRG = "chacha20/256-bit-seed/uint64-le"
"""Named in the protocol (the server must say it uses the same) and in the ledger's evidence."""
_NONCE_PRIVATE = (0).to_bytes(4, "little") + b"fgsa1-privat"  # 32-bit block counter, 96-bit nonce
_NONCE_PAIRWISE = (0).to_bytes(4, "little") + b"fgsa1-pairws"
_MAX_WORDS = (1 << 32) * 8  # the 32-bit block counter covers 2^32 blocks of 64 bytes


def _stream(seed: bytes, nonce: bytes, length: int) -> np.ndarray:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    if not 0 <= length <= _MAX_WORDS:
        raise ValueError(f"a mask has 0 to {_MAX_WORDS} words, not {length}")
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    out = np.empty(length + _SLACK_WORDS, dtype="<u8")  # update_into wants a block of room to spare
    encryptor.update_into(_zeros(8 * length), out.data.cast("B"))
    return out[:length].view(np.uint64)


_SLACK_WORDS = 8
_ZEROS = memoryview(b"")
_ZEROS_LOCK = threading.Lock()


def _zeros(size: int) -> memoryview:
    """A shared read-only buffer of zeros (the keystream is ChaCha20 over zeros)."""
    global _ZEROS
    with _ZEROS_LOCK:
        if len(_ZEROS) < size:
            _ZEROS = memoryview(bytes(size))
        return _ZEROS[:size]


def private_mask(seed: bytes, length: int) -> np.ndarray:
    """The hospital's own mask (removed by the server with the seed's reconstructed shares)."""
    return _stream(seed, _NONCE_PRIVATE, length)


def pairwise_seed(shared_key: bytes) -> bytes:
    """The 32-byte seed inside Flower's base64url-encoded shared key."""
    try:
        seed = base64.urlsafe_b64decode(shared_key)
    except (binascii.Error, ValueError) as err:
        raise ValueError("a shared key is not base64url") from err
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a shared key holds {len(seed)} bytes, not {SEED_BYTES}")
    return seed


def pairwise_mask(shared_key: bytes, length: int) -> np.ndarray:
    """The mask two hospitals share: the larger node id adds it, the smaller subtracts it, so it
    cancels in their sum (as in Flower's protocol)."""
    return _stream(pairwise_seed(shared_key), _NONCE_PAIRWISE, length)


def apply_pairwise(vector: np.ndarray, own: int, other: int, mask: np.ndarray) -> None:
    """In place, mod 2^64: + mask when own > other, - mask otherwise."""
    if own > other:
        np.add(vector, mask, out=vector)
    else:
        np.subtract(vector, mask, out=vector)


__all__ = ["PRG", "SEED_BYTES", "apply_pairwise", "pairwise_mask", "pairwise_seed", "private_mask"]
