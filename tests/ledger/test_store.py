"""Write-ahead appends, and every tamper that `verify` must detect."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from fedgate.canonical import canonical_json
from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger.signing import load_or_create_signer
from fedgate.ledger.store import Ledger, SignedTreeHead, TreeHead
from fedgate.ledger.verify import verify_ledger


def make_ledger(folder: Path, n: int = 5) -> Path:
    with Ledger(folder) as ledger:
        for i in range(n):
            ledger.append(
                {"kind": "reply-sent", "round": i, "note": f"entry {i}"}, {"sent": f"payload {i}".encode() * 10}
            )
    return folder


def db(folder: Path) -> sqlite3.Connection:
    return sqlite3.connect(folder / "ledger.sqlite", isolation_level=None)


def expect_broken(folder: Path, seq: int | None, match: str) -> None:
    with pytest.raises(LedgerVerificationError, match=match) as info:
        verify_ledger(folder)
    if seq is not None:
        assert info.value.seq == seq


def test_whole_ledger_verifies(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    result = verify_ledger(folder)
    assert (result.entries, result.tree_heads) == (5, 5)
    with Ledger(folder, create=False) as ledger:
        entries = ledger.entries()
    assert [e["seq"] for e in entries] == list(range(5))
    assert all(e["time"].endswith("Z") for e in entries)
    assert entries[2]["payloads"]["sent"]["size"] == len(b"payload 2" * 10)


def test_key_is_private_and_reused(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 1)
    assert (folder / "signing.key").stat().st_mode & 0o777 == 0o600
    first = load_or_create_signer(folder).verifier.key_id
    assert load_or_create_signer(folder).verifier.key_id == first
    (folder / "signing.key").chmod(0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        load_or_create_signer(folder)


def test_reserved_fields_are_refused(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l") as ledger, pytest.raises(LedgerError, match="seq"):
        ledger.append({"seq": 9})


def test_flipped_byte_in_an_entry(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        raw = bytearray(conn.execute("SELECT entry FROM entries WHERE seq = 2").fetchone()[0])
        raw[raw.index(b"entry 2")] ^= 0x01
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 2", (bytes(raw),))
    expect_broken(folder, 2, "do not match the signed tree head")


def test_rewritten_entry_with_recomputed_leaf_hash(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        entry = json.loads(conn.execute("SELECT entry FROM entries WHERE seq = 3").fetchone()[0])
        entry["note"] = "nothing to see"
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 3", (canonical_json(entry),))
    expect_broken(folder, 3, "signed tree head")


def test_flipped_byte_in_a_blob(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    blobs = sorted(p for p in (folder / "blobs").rglob("*") if p.is_file())
    assert blobs
    data = bytearray(blobs[0].read_bytes())
    data[0] ^= 0x80
    blobs[0].write_bytes(bytes(data))
    expect_broken(folder, None, "does not match its hash")


def test_swapped_blobs(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    a, b = sorted(p for p in (folder / "blobs").rglob("*") if p.is_file())[:2]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    expect_broken(folder, None, "altered or swapped")


def test_missing_blob(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with Ledger(folder, create=False) as ledger:
        digest = ledger.entries()[1]["payloads"]["sent"]["sha256"]
        ledger.blobs.path(digest).unlink()
    expect_broken(folder, 1, "missing")


def test_deleted_entry(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        conn.execute("DELETE FROM entries WHERE seq = 1")
    expect_broken(folder, 1, "missing")


def test_reordered_entries(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        rows = {s: e for s, e in conn.execute("SELECT seq, entry FROM entries WHERE seq IN (1, 2)")}
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 1", (rows[2],))
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 2", (rows[1],))
    expect_broken(folder, 1, "moved or duplicated")


def test_duplicated_entry(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        entry = conn.execute("SELECT entry FROM entries WHERE seq = 4").fetchone()[0]
        conn.execute("INSERT INTO entries (seq, entry, leaf_hash) VALUES (5, ?, x'00')", (entry,))
    expect_broken(folder, 5, "moved or duplicated")


def test_truncated_entries(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        conn.execute("DELETE FROM entries WHERE seq >= 3")
    expect_broken(folder, 3, "truncated")


def test_truncation_that_also_drops_heads_is_caught_by_a_trusted_head(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with Ledger(folder, create=False) as ledger:
        trusted = ledger.latest_head()
    with db(folder) as conn:
        conn.execute("DELETE FROM entries WHERE seq >= 3")
        conn.execute("DELETE FROM tree_heads WHERE size > 3")
    verify_ledger(folder)  # locally consistent: this is what an outside witness is for
    with pytest.raises(LedgerVerificationError, match="no longer contains the trusted tree"):
        verify_ledger(folder, trusted_head=trusted)


def test_forged_tree_head(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        head = json.loads(conn.execute("SELECT head FROM tree_heads ORDER BY id DESC LIMIT 1").fetchone()[0])
        head["root"] = "00" * 32
        conn.execute(
            "UPDATE tree_heads SET head = ? WHERE id = (SELECT MAX(id) FROM tree_heads)", (canonical_json(head),)
        )
    expect_broken(folder, None, "bad signature")


def test_replayed_tree_head(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        old = conn.execute("SELECT size, head, signature FROM tree_heads WHERE size = 2").fetchone()
        conn.execute("INSERT INTO tree_heads (size, head, signature) VALUES (?, ?, ?)", old)
    expect_broken(folder, None, "out of order")


def test_tree_head_signed_by_another_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    other = load_or_create_signer(tmp_path / "intruder")
    with Ledger(folder, create=False) as ledger:
        latest = ledger.latest_head()
    assert latest is not None
    for key_id in (latest.head.key_id, other.verifier.key_id):  # copied id, or its own
        head = TreeHead(latest.head.size, latest.head.root, latest.head.time, key_id)
        forged = SignedTreeHead(head, other.sign(head.signed_bytes))
        with db(folder) as conn:
            conn.execute(
                "UPDATE tree_heads SET head = ?, signature = ? WHERE id = (SELECT MAX(id) FROM tree_heads)",
                (canonical_json(head.to_json()), forged.signature),
            )
        expect_broken(folder, None, "bad signature or another key")


def test_replaced_public_key_does_not_verify_old_heads(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    other = load_or_create_signer(tmp_path / "intruder")
    shutil.copy(tmp_path / "intruder" / "signing.pub", folder / "signing.pub")
    expect_broken(folder, None, "another key")
    assert other.verifier.key_id


def test_no_ledger_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=r"public key|holds no ledger"):
        verify_ledger(tmp_path)
