"""RFC 9162 (Certificate Transparency v2) Merkle tree: hashing, proofs, verification.

Pure functions over leaf hashes. SHA-256; leaf = H(0x00 || data), node = H(0x01 || l || r);
a tree of n > 1 leaves splits at k, the largest power of two below n; the empty tree's
root is H(""). Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by step."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    n = len(leaf_hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(root(leaf_hashes[:k]), root(leaf_hashes[k:]))


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]): the audit path for leaf `index`."""
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise IndexError(f"leaf {index} is not in a tree of {n}")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaf_hashes[:k]), root(leaf_hashes[k:])]
    return [*inclusion_proof(index - k, leaf_hashes[k:]), root(leaf_hashes[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """RFC 9162 2.1.3.2: does `proof` show that leaf hash `leaf` sits at `index` of the
    tree of `size` leaves whose root is `expected_root`?"""
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def _subproof(m: int, leaf_hashes: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaf_hashes)
    if m == n:
        return [] if complete else [root(leaf_hashes)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaf_hashes[:k], complete), root(leaf_hashes[k:])]
    return [*_subproof(m - k, leaf_hashes[k:], False), root(leaf_hashes[:k])]


def consistency_proof(size1: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]): shows that the tree of the first `size1` leaves is a prefix."""
    n = len(leaf_hashes)
    if not 0 <= size1 <= n:
        raise IndexError(f"cannot prove size {size1} against a tree of {n}")
    if size1 == 0 or size1 == n:
        return []
    return _subproof(size1, leaf_hashes, True)


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> bool:
    """RFC 9162 2.1.4.2: is the tree (size1, root1) a prefix of the tree (size2, root2)?"""
    if size1 < 0 or size2 < size1 or any(len(p) != HASH_SIZE for p in proof):
        return False
    if size1 == size2:
        return not proof and root1 == root2
    if size1 == 0:
        return not proof  # the empty tree is a prefix of everything; nothing to prove
    if not proof:
        return False
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: root1 is a node of the new tree
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn != 0 and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == root1 and sr == root2 and sn == 0


def prefix_roots(leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """root(leaf_hashes[:k]) for k = 1..n in O(n log n): the tree of k leaves is its
    perfect subtrees (one per set bit of k) folded from the right."""
    stack: list[tuple[int, bytes]] = []
    roots: list[bytes] = []
    for leaf in leaf_hashes:
        stack.append((1, leaf))
        while len(stack) >= 2 and stack[-1][0] == stack[-2][0]:
            (size, right), (_, left) = stack.pop(), stack.pop()
            stack.append((2 * size, node_hash(left, right)))
        acc = stack[-1][1]
        for _, subtree in reversed(stack[:-1]):
            acc = node_hash(subtree, acc)
        roots.append(acc)
    return roots
