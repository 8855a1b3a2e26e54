"""A compact Merkle range: the RFC 9162 tree of n leaves held as its O(log n) perfect subtrees.

The tree of n leaves is the perfect subtrees of sizes given by the set bits of n, largest
first, folded from the right (as transparency-dev/merkle's `compact.Range` over [0, n)).
Appending a leaf merges as many subtrees as n has trailing one bits, so the ledger extends
its signed root in O(log n) without reading any earlier leaf. Pure functions, no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from fedgate.ledger.merkle import HASH_SIZE, node_hash

EMPTY_ROOT = hashlib.sha256(b"").digest()


@dataclass(frozen=True)
class CompactRange:
    """The leaves [0, size) as the roots of their perfect subtrees, largest subtree first."""

    size: int
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if self.size < 0 or len(self.hashes) != self.size.bit_count():
            raise ValueError(
                f"a range of {self.size} leaves has {self.size.bit_count()} subtrees, not {len(self.hashes)}"
            )
        if any(len(h) != HASH_SIZE for h in self.hashes):
            raise ValueError("every subtree root is a SHA-256 hash")

    @classmethod
    def empty(cls) -> CompactRange:
        return cls(0, ())

    @classmethod
    def from_leaves(cls, leaf_hashes: Iterable[bytes]) -> CompactRange:
        compact = cls.empty()
        for leaf in leaf_hashes:
            compact = compact.append(leaf)
        return compact

    def append(self, leaf_hash: bytes) -> CompactRange:
        """The range of size + 1: each trailing one bit of `size` is a subtree of equal size
        to merge with the new one."""
        hashes = list(self.hashes)
        merged, n = leaf_hash, self.size
        while n & 1:
            merged = node_hash(hashes.pop(), merged)
            n >>= 1
        hashes.append(merged)
        return CompactRange(self.size + 1, tuple(hashes))

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        acc = self.hashes[-1]
        for subtree in reversed(self.hashes[:-1]):
            acc = node_hash(subtree, acc)
        return acc

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> CompactRange:
        """Parse the stored form; ValueError when it cannot be a range of `size` leaves."""
        if len(data) != HASH_SIZE * size.bit_count():
            raise ValueError(f"{len(data)} bytes cannot hold the {size.bit_count()} subtree roots of {size} leaves")
        return cls(size, tuple(data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)))
