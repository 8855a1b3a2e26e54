"""The compact range that appends extend: its root is the RFC 9162 root of the same leaves."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_merkle import CT_LEAVES, CT_ROOTS

from fedgate.ledger import merkle
from fedgate.ledger.compact import CompactRange

leaves_strategy = st.lists(st.binary(max_size=8), max_size=70).map(lambda xs: [merkle.leaf_hash(x) for x in xs])


def test_ct_vectors_leaf_by_leaf() -> None:
    compact = CompactRange.empty()
    assert compact.root() == merkle.root([])
    for k, leaf in enumerate(CT_LEAVES, start=1):
        compact = compact.append(leaf)
        assert compact.root().hex() == CT_ROOTS[k - 1]
    assert compact.hashes == (merkle.root(CT_LEAVES),)  # 8 leaves: one perfect subtree


@settings(max_examples=200, deadline=None)
@given(leaves=leaves_strategy)
def test_root_equals_the_merkle_root_for_any_n_appending_leaf_by_leaf(leaves: list[bytes]) -> None:
    compact = CompactRange.empty()
    for k, leaf in enumerate(leaves, start=1):
        compact = compact.append(leaf)
        assert compact.size == k and len(compact.hashes) == k.bit_count()  # O(log n) kept
        assert compact.root() == merkle.root(leaves[:k])
    assert CompactRange.from_leaves(leaves) == compact


@settings(max_examples=100, deadline=None)
@given(leaves=leaves_strategy)
def test_stored_form_round_trips(leaves: list[bytes]) -> None:
    compact = CompactRange.from_leaves(leaves)
    assert CompactRange.from_bytes(compact.size, compact.to_bytes()) == compact


@settings(max_examples=100, deadline=None)
@given(leaves=leaves_strategy.filter(bool), pick=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_changing_any_earlier_leaf_changes_the_root(leaves: list[bytes], pick: int, bit: int) -> None:
    index = pick % len(leaves)
    tampered = list(leaves)
    tampered[index] = bytes([tampered[index][0] ^ (1 << bit)]) + tampered[index][1:]
    assert CompactRange.from_leaves(tampered).root() != CompactRange.from_leaves(leaves).root()


@pytest.mark.parametrize(("size", "data"), [(3, b"\x00" * 32), (1, b"\x00" * 31), (0, b"\x00" * 32), (-1, b"")])
def test_a_stored_range_of_the_wrong_shape_is_refused(size: int, data: bytes) -> None:
    with pytest.raises(ValueError, match=r"subtree|leaves"):
        CompactRange.from_bytes(size, data)
