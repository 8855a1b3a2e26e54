"""RFC 9162 Merkle tree against the Certificate Transparency vectors, plus properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.ledger import merkle

# The 8-leaf tree of the CT / transparency-dev test vectors.
CT_INPUTS = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
CT_LEAVES = [merkle.leaf_hash(bytes.fromhex(x)) for x in CT_INPUTS]
# Roots of the first k leaves, k = 1..8 (RFC 6962 / transparency-dev reference values).
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert merkle.root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_ct_vector_roots() -> None:
    for k in range(1, 9):
        assert merkle.root(CT_LEAVES[:k]).hex() == CT_ROOTS[k - 1]
    assert merkle.root(CT_LEAVES).hex().startswith("5dc9da79")
    assert [r.hex() for r in merkle.prefix_roots(CT_LEAVES)] == CT_ROOTS


def test_ct_vector_inclusion_proof_of_leaf_0() -> None:
    proof = merkle.inclusion_proof(0, CT_LEAVES)
    assert [p.hex() for p in proof] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]


def test_ct_vector_consistency_proofs() -> None:
    expected = {
        (1, 8): [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
        (6, 8): [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
        (2, 5): [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    }
    for (m, n), proof in expected.items():
        got = merkle.consistency_proof(m, CT_LEAVES[:n])
        assert [p.hex() for p in got] == proof
        assert merkle.verify_consistency(m, n, got, bytes.fromhex(CT_ROOTS[m - 1]), bytes.fromhex(CT_ROOTS[n - 1]))


leaves_strategy = st.lists(st.binary(max_size=8), min_size=1, max_size=40).map(
    lambda xs: [merkle.leaf_hash(x) for x in xs]
)


def _flip(data: bytes, bit: int) -> bytes:
    array = bytearray(data)
    array[(bit // 8) % len(array)] ^= 1 << (bit % 8)
    return bytes(array)


@settings(max_examples=150, deadline=None)
@given(leaves=leaves_strategy, pick=st.integers(0, 10**6), bit=st.integers(0, 255))
def test_every_inclusion_proof_verifies_and_any_flip_fails(leaves: list[bytes], pick: int, bit: int) -> None:
    n = len(leaves)
    index = pick % n
    root = merkle.root(leaves)
    proof = merkle.inclusion_proof(index, leaves)
    assert merkle.verify_inclusion(leaves[index], index, n, proof, root)
    assert not merkle.verify_inclusion(leaves[index], index, n, proof, _flip(root, bit))
    assert not merkle.verify_inclusion(_flip(leaves[index], bit), index, n, proof, root)
    if proof:
        which = pick % len(proof)
        tampered = [*proof[:which], _flip(proof[which], bit), *proof[which + 1 :]]
        assert not merkle.verify_inclusion(leaves[index], index, n, tampered, root)
    if n > 1 and leaves[index] != leaves[(index + 1) % n]:
        assert not merkle.verify_inclusion(leaves[index], (index + 1) % n, n, proof, root)
    # Size is not checked here on purpose: RFC 9162's algorithm accepts the proof for
    # (0, 3) at size 4 with the size-3 root. Size and root are bound together by the signed
    # tree head; test_proofs.py flips the size of a signed proof and sees it fail.


@settings(max_examples=150, deadline=None)
@given(leaves=leaves_strategy, pick=st.integers(0, 10**6), bit=st.integers(0, 255))
def test_every_consistency_proof_verifies_and_any_flip_fails(leaves: list[bytes], pick: int, bit: int) -> None:
    n = len(leaves)
    m = 1 + pick % n
    root1, root2 = merkle.root(leaves[:m]), merkle.root(leaves)
    proof = merkle.consistency_proof(m, leaves)
    assert merkle.verify_consistency(m, n, proof, root1, root2)
    assert not merkle.verify_consistency(m, n, proof, _flip(root1, bit), root2)
    assert not merkle.verify_consistency(m, n, proof, root1, _flip(root2, bit))
    if proof:
        which = pick % len(proof)
        tampered = [*proof[:which], _flip(proof[which], bit), *proof[which + 1 :]]
        assert not merkle.verify_consistency(m, n, tampered, root1, root2)


def test_index_and_size_out_of_range_fail() -> None:
    root = merkle.root(CT_LEAVES)
    proof = merkle.inclusion_proof(7, CT_LEAVES)
    assert not merkle.verify_inclusion(CT_LEAVES[7], 8, 8, proof, root)
    assert not merkle.verify_inclusion(CT_LEAVES[7], -1, 8, proof, root)
    assert not merkle.verify_inclusion(CT_LEAVES[7], 7, 0, proof, root)
