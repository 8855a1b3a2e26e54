from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fedgate.errors import LedgerVerificationError
from fedgate.ledger.export import export_bundle
from fedgate.ledger.proof import check_proof, make_proof
from fedgate.ledger.verify import verify_ledger
from test_store import make_ledger


def test_proof_checks_with_only_the_public_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 7)
    proof = make_proof(folder, 4)
    result = check_proof(proof, (folder / "signing.pub").read_bytes())
    assert result["seq"] == 4 and result["tree_size"] == 7


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p.update(seq=3),
        lambda p: p.update(tree_size=8),
        lambda p: p.update(entry=p["entry"].replace("entry 4", "entry 5")),
        lambda p: p["proof"].__setitem__(0, "00" * 32),
        lambda p: p["tree_head"].update(root="11" * 32),
        lambda p: p["tree_head"].update(size=6),
        lambda p: p.update(format="something-else"),
    ],
)
def test_tampered_proof_fails(tmp_path: Path, tamper) -> None:
    folder = make_ledger(tmp_path / "l", 7)
    proof = copy.deepcopy(make_proof(folder, 4))
    tamper(proof)
    with pytest.raises(LedgerVerificationError):
        check_proof(proof, (folder / "signing.pub").read_bytes())


def test_proof_under_another_pinned_key_fails(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 3)
    other = make_ledger(tmp_path / "other", 1)
    with pytest.raises(LedgerVerificationError, match="signature"):
        check_proof(make_proof(folder, 1), (other / "signing.pub").read_bytes())


def test_export_bundle_verifies_elsewhere_without_the_private_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 4)
    bundle = tmp_path / "bundle"
    assert export_bundle(folder, bundle) == 4
    moved = tmp_path / "elsewhere"
    bundle.rename(moved)
    assert not (moved / "signing.key").exists()
    assert verify_ledger(moved).entries == 4
    assert check_proof(make_proof(moved, 2))["seq"] == 2
