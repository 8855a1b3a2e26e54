"""Inclusion and consistency proofs under a pinned key, and the auditor's export bundle."""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedgate.canonical import canonical_json
from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger import export
from fedgate.ledger.export import export_bundle
from fedgate.ledger.proof import check_consistency, check_proof, make_consistency_proof, make_proof
from fedgate.ledger.signing import Verifier
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger
from test_store import append_one, make_ledger


def pem(folder: Path) -> bytes:
    return (folder / "signing.pub").read_bytes()


def test_proof_checks_with_only_the_public_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 7)
    proof = make_proof(folder, 4)
    result = check_proof(proof, pem(folder))
    assert result["seq"] == 4 and result["tree_size"] == 7


def test_proof_checks_with_only_the_fingerprint(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 3)
    fingerprint = verify_ledger(folder).key_id
    assert check_proof(make_proof(folder, 1), pinned_fingerprint=fingerprint)["seq"] == 1
    with pytest.raises(LedgerVerificationError, match="not the pinned"):
        check_proof(make_proof(folder, 1), pinned_fingerprint="ab" * 32)


def test_a_proof_is_never_checked_with_only_the_key_it_carries(tmp_path: Path) -> None:
    """The intruder's proof carries the intruder's key: with no pin there is no check at all."""
    folder = make_ledger(tmp_path / "l", 3)
    with pytest.raises(LedgerError, match="needs the hospital's key"):
        check_proof(make_proof(folder, 1))
    forged = make_ledger(tmp_path / "forged", 3)
    honest = verify_ledger(folder).key_id
    with pytest.raises(LedgerVerificationError, match="not the pinned"):
        check_proof(make_proof(forged, 1), pinned_fingerprint=honest)
    with pytest.raises(LedgerVerificationError, match="signature"):
        check_proof(make_proof(forged, 1), pem(folder))


Tamper = Callable[[dict[str, Any]], object]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p.update(seq=3),
        lambda p: p.update(tree_size=8),
        lambda p: p.update(entry=p["entry"].replace("entry 4", "entry 5")),
        lambda p: p["proof"].__setitem__(0, "00" * 32),
        lambda p: p["proof"].__setitem__(0, "not hex"),
        lambda p: p["proof"].append("00" * 32),
        lambda p: p["tree_head"].update(root="11" * 32),
        lambda p: p["tree_head"].update(size=6),
        lambda p: p["tree_head"].update(size=7.0),
        lambda p: p["tree_head"].pop("state_sha256"),
        lambda p: p.update(format="something-else"),
        lambda p: p.update(seq="4"),
        lambda p: p.update(entry=4),
        lambda p: p.update(proof="00"),
        lambda p: p.update(extra=1),
        lambda p: p.pop("tree_head"),
    ],
)
def test_tampered_or_malformed_proof_fails_cleanly(tmp_path: Path, tamper: Tamper) -> None:
    folder = make_ledger(tmp_path / "l", 7)
    proof = copy.deepcopy(make_proof(folder, 4))
    tamper(proof)
    with pytest.raises(LedgerVerificationError):
        check_proof(proof, pem(folder))


@pytest.mark.parametrize("document", [None, [], "proof", {"format": "fedgate-inclusion-proof/1"}])
def test_a_proof_that_is_not_one_fails_cleanly(tmp_path: Path, document: object) -> None:
    folder = make_ledger(tmp_path / "l", 1)
    with pytest.raises(LedgerVerificationError, match="malformed proof"):
        check_proof(document, pem(folder))


def test_proof_under_another_pinned_key_fails(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 3)
    other = make_ledger(tmp_path / "other", 1)
    with pytest.raises(LedgerVerificationError, match="signature"):
        check_proof(make_proof(folder, 1), pem(other))


# --- consistency between two heads -----------------------------------------------------------


def test_the_current_head_extends_an_older_one(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 3)
    verifier = Verifier.from_pem(pem(folder))
    for old_size in range(4):
        with Ledger(folder, create=False) as ledger:
            old = ledger.tree_heads()[old_size]
        append_one(folder, f"after {old_size}")
        result = check_consistency(make_consistency_proof(folder, old), verifier)
        assert result["old_size"] == old_size and result["new_size"] == 4 + old_size


def test_a_rewritten_history_is_not_consistent_with_the_old_head(tmp_path: Path) -> None:
    """A ledger re-created from scratch (same key) with a different entry 1: heads verify, yet
    the new tree does not extend the head the DPO kept."""
    folder = make_ledger(tmp_path / "l", 4)
    old = verify_ledger(folder).latest_head
    with sqlite3.connect(folder / "ledger.sqlite") as conn:
        conn.execute("DELETE FROM entries")
        conn.execute("DELETE FROM tree_heads")
        conn.execute("DROP TABLE tip")
        conn.execute("DROP TABLE entries")
        conn.execute("DROP TABLE tree_heads")
    with Ledger(folder) as ledger:  # an empty database with the key: a "new" ledger, same key
        for i in range(6):
            ledger.append({"kind": "reply-sent", "round": i, "note": "rewritten" if i == 1 else f"entry {i}"})
    assert verify_ledger(folder).entries == 6  # locally consistent
    with pytest.raises(LedgerVerificationError, match="does not extend the old tree of 4"):
        check_consistency(make_consistency_proof(folder, old), Verifier.from_pem(pem(folder)))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["proof"].__setitem__(0, "00" * 32),
        lambda d: d["proof"].pop(),
        lambda d: d["new_head"].update(size=d["new_head"]["size"] + 1),
        lambda d: d["old_head"].update(root="00" * 32),
        lambda d: d.update(proof=None),
        lambda d: d.update(format="x"),
    ],
)
def test_tampered_consistency_proofs_fail(tmp_path: Path, tamper: Tamper) -> None:
    folder = make_ledger(tmp_path / "l", 3)
    with Ledger(folder, create=False) as ledger:
        old = ledger.tree_heads()[2]
    append_one(folder)
    document = make_consistency_proof(folder, old)
    tamper(document)
    with pytest.raises(LedgerVerificationError):
        check_consistency(document, Verifier.from_pem(pem(folder)))


def test_a_shorter_ledger_is_not_consistent(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 3)
    old = verify_ledger(folder).latest_head
    with sqlite3.connect(folder / "ledger.sqlite") as conn:
        conn.execute("DELETE FROM entries WHERE seq = 2")
    with pytest.raises(LedgerError):
        make_consistency_proof(folder, old)


# --- export -------------------------------------------------------------------------------------


def test_export_bundle_verifies_elsewhere_without_the_private_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 4)
    fingerprint = verify_ledger(folder).key_id
    bundle = tmp_path / "bundle"
    assert export_bundle(folder, bundle) == 4
    moved = tmp_path / "elsewhere"
    bundle.rename(moved)
    assert not (moved / "signing.key").exists()
    assert verify_ledger(moved, pinned_fingerprint=fingerprint).entries == 4
    assert check_proof(make_proof(moved, 2), pinned_fingerprint=fingerprint)["seq"] == 2
    head = json.loads((moved / "tree_head.json").read_text())
    assert head == verify_ledger(moved).latest_head.to_json()


def test_export_reads_only_its_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node appends right after the snapshot: the bundle's entries, blobs and head are the
    snapshot's, and it verifies (the old export read entries and head from the live ledger)."""
    folder = make_ledger(tmp_path / "l", 3)
    snapshot = export._snapshot

    def snapshot_then_append(ledger: Ledger, target: Path) -> None:
        snapshot(ledger, target)
        with Ledger(folder, create=False) as live:
            live.append({"kind": "reply-sent", "note": "after the snapshot"}, {"sent": b"late payload"})

    monkeypatch.setattr(export, "_snapshot", snapshot_then_append)
    assert export_bundle(folder, tmp_path / "bundle") == 3
    result = verify_ledger(tmp_path / "bundle")
    assert result.entries == 3 and result.latest_head.head.size == 3
    assert json.loads((tmp_path / "bundle" / "tree_head.json").read_text())["size"] == 3
    assert len([p for p in (tmp_path / "bundle" / "blobs").rglob("*") if p.is_file()]) == 3
    assert verify_ledger(folder).entries == 4


def test_export_of_a_ledger_with_a_malformed_digest_copies_no_path_outside(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 2)
    (tmp_path / "secret").write_text("not for the auditor")
    with sqlite3.connect(folder / "ledger.sqlite") as conn:
        entry = json.loads(conn.execute("SELECT entry FROM entries WHERE seq = 1").fetchone()[0])
        entry["payloads"]["sent"]["sha256"] = "../../../secret"
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 1", (canonical_json(entry),))
    export_bundle(folder, tmp_path / "bundle")
    assert not any("secret" in p.name for p in (tmp_path / "bundle").rglob("*"))
    with pytest.raises(LedgerVerificationError, match=r"at entry 1: .*not a SHA-256 digest"):
        verify_ledger(tmp_path / "bundle")
