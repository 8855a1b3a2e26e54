"""Write-ahead appends, append-only checks at every append, the signed state, the key's
life cycle, and the tampers that `verify` must detect."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from fedgate.canonical import canonical_json
from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger import merkle, store
from fedgate.ledger.compact import CompactRange
from fedgate.ledger.formats import sha256_hex
from fedgate.ledger.signing import create_signer, load_signer
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


def expect_broken(folder: Path, seq: int | None, match: str, **kwargs: object) -> LedgerVerificationError:
    with pytest.raises(LedgerVerificationError, match=match) as info:
        verify_ledger(folder, **kwargs)  # type: ignore[arg-type]
    if seq is not None:
        assert info.value.seq == seq
    return info.value


def append_one(folder: Path, note: str = "next") -> None:
    with Ledger(folder, create=False) as ledger:
        ledger.append({"kind": "reply-sent", "note": note})


def test_whole_ledger_verifies(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    result = verify_ledger(folder)
    assert (result.entries, result.tree_heads) == (5, 6)  # the empty head of creation, then one per append
    assert result.latest_head.head.size == 5 and not result.pinned
    with Ledger(folder, create=False) as ledger:
        entries = ledger.entries()
        assert [h.head.size for h in ledger.tree_heads()] == list(range(6))
    assert [e["seq"] for e in entries] == list(range(5))
    assert all(e["time"].endswith("Z") for e in entries)
    assert entries[2]["payloads"]["sent"]["size"] == len(b"payload 2" * 10)


def test_the_entry_and_its_head_share_one_time(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 2)
    with Ledger(folder, create=False) as ledger:
        assert ledger.entries()[1]["time"] == ledger.tree_heads()[2].head.time


# --- the key ---------------------------------------------------------------------------------


def test_creation_makes_a_private_key_and_gives_its_fingerprint(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l") as ledger:
        assert ledger.created
        fingerprint = ledger.fingerprint
    assert (tmp_path / "l" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    with Ledger(tmp_path / "l") as ledger:
        assert not ledger.created and ledger.fingerprint == fingerprint
    assert verify_ledger(tmp_path / "l", pinned_fingerprint=fingerprint).pinned


def test_key_is_private_and_reused(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 1)
    first = load_signer(folder).verifier.key_id
    assert load_signer(folder).verifier.key_id == first
    (folder / "signing.key").chmod(0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        load_signer(folder)


def test_a_key_is_never_replaced(tmp_path: Path) -> None:
    create_signer(tmp_path)
    with pytest.raises(FileExistsError):
        create_signer(tmp_path)


def test_missing_private_key_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 2)
    (folder / "signing.key").unlink()
    for create in (True, False):
        with Ledger(folder, create=create) as ledger, pytest.raises(LedgerError, match=r"signing key .* is missing"):
            ledger.append({"kind": "reply-sent"})
    assert not (folder / "signing.key").exists()
    assert verify_ledger(folder).entries == 2


def test_a_creation_that_crashed_after_the_key_reuses_it(tmp_path: Path) -> None:
    signer = create_signer(tmp_path / "l")  # the key is written before the database
    with Ledger(tmp_path / "l") as ledger:
        assert ledger.created and ledger.fingerprint == signer.verifier.key_id


def test_reading_a_folder_without_a_ledger_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="holds no ledger"):
        Ledger(tmp_path, create=False)
    with pytest.raises(LedgerError, match="holds no ledger"):
        verify_ledger(tmp_path)
    assert not (tmp_path / "signing.key").exists()


def test_an_old_format_ledger_is_refused_not_extended(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    with db(tmp_path / "l") as conn:
        conn.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL, leaf_hash BLOB NOT NULL)")
    with pytest.raises(LedgerError, match="no tip table"):
        Ledger(tmp_path / "l")


# --- appends check the latest signed head ---------------------------------------------------


def test_the_issue_attack_is_refused_at_the_next_append_and_caught_by_verify(tmp_path: Path) -> None:
    """Rewrite entry 1 (and a leaf hash column, as the old schema had), delete the heads, append."""
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        entry = json.loads(conn.execute("SELECT entry FROM entries WHERE seq = 1").fetchone()[0])
        entry["note"] = "nothing to see"
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 1", (canonical_json(entry),))
        conn.execute("DELETE FROM tree_heads")
    with pytest.raises(LedgerError, match=r"does not match its latest signed head .*no signed tree head"):
        append_one(folder)
    with db(folder) as conn:
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 5  # nothing written
    expect_broken(folder, None, "no signed tree head")


def test_a_rewritten_entry_under_intact_heads_is_never_re_signed(tmp_path: Path) -> None:
    """An append over a rewritten entry extends the *signed* history (the compact range), so
    the new head still disagrees with the rewritten entry, and verify names it."""
    folder = make_ledger(tmp_path / "l")
    honest = [json.loads(raw) for _, raw in db(folder).execute("SELECT seq, entry FROM entries ORDER BY seq")]
    with db(folder) as conn:
        honest[1]["note"] = "nothing to see"
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 1", (canonical_json(honest[1]),))
    append_one(folder)
    expect_broken(folder, 1, "do not match the signed tree head of size 2")


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        ("DELETE FROM tree_heads WHERE id = (SELECT MAX(id) FROM tree_heads)", "covers 5 entries, the signed head 4"),
        ("DELETE FROM entries WHERE seq = 4", "entries 0..3"),
        ("INSERT INTO entries (seq, entry) VALUES (5, x'7b7d')", "entries 0..5"),
        ("DELETE FROM entries WHERE seq = 0", "entries 1..4"),
        ("UPDATE tip SET compact = zeroblob(length(compact))", "root is not the signed root"),
        ("UPDATE tip SET compact = x'00'", "compact range is malformed"),
        ("UPDATE tip SET size = 4", "covers 4 entries"),
        ("DELETE FROM tip", "compact range is missing"),
        ("UPDATE tip SET state = CAST('{\"round\":0}' AS BLOB)", "state is not the state the head signed"),
        ("UPDATE tree_heads SET signature = zeroblob(64) WHERE id = (SELECT MAX(id) FROM tree_heads)", "signature"),
        ("UPDATE tree_heads SET head = x'00' WHERE id = (SELECT MAX(id) FROM tree_heads)", "not JSON"),
        (
            "INSERT INTO tree_heads (size, head, signature) "
            "SELECT size, head, signature FROM tree_heads WHERE size = 3",
            "covers 5 entries, the signed head 3",
        ),
    ],
)
def test_every_disagreement_with_the_latest_head_refuses_the_append(tmp_path: Path, tamper: str, why: str) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        conn.execute(tamper)
        before = conn.execute("SELECT COUNT(*), (SELECT COUNT(*) FROM tree_heads) FROM entries").fetchone()
    with pytest.raises(LedgerError, match=why):
        append_one(folder)
    with db(folder) as conn:
        assert conn.execute("SELECT COUNT(*), (SELECT COUNT(*) FROM tree_heads) FROM entries").fetchone() == before
    with pytest.raises(LedgerVerificationError):
        verify_ledger(folder)


def test_a_compact_range_rebuilt_from_rewritten_leaves_does_not_match_the_signed_root(tmp_path: Path) -> None:
    """The attacker recomputes the tip from the rewritten entries: the head's signature still
    binds the old root, so the append refuses."""
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        entry = json.loads(conn.execute("SELECT entry FROM entries WHERE seq = 1").fetchone()[0])
        entry["note"] = "nothing to see"
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 1", (canonical_json(entry),))
        leaves = [merkle.leaf_hash(raw) for (raw,) in conn.execute("SELECT entry FROM entries ORDER BY seq")]
        conn.execute("UPDATE tip SET compact = ? WHERE id = 0", (CompactRange.from_leaves(leaves).to_bytes(),))
    with pytest.raises(LedgerError, match="root is not the signed root"):
        append_one(folder)


def test_appends_never_read_old_entries(tmp_path: Path) -> None:
    """O(log n): an append reads the latest head, the tip and two index look-ups, never the
    entries themselves (the old code re-hashed every leaf)."""
    folder = make_ledger(tmp_path / "l", 3)
    statements: list[str] = []
    with Ledger(folder, create=False) as ledger:
        ledger.db.set_trace_callback(statements.append)
        ledger.append({"kind": "reply-sent"})
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(reads) == 3
    assert not any("entry" in s for s in reads)  # no entry is read back
    assert all("LIMIT 1" in s for s in reads if "tree_heads" in s)  # only the latest head


def test_a_clock_step_back_keeps_the_ledger_verifiable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_ledger(tmp_path / "l", 2)
    with Ledger(folder, create=False) as ledger:
        last = ledger.tree_heads()[-1].head.time
        monkeypatch.setattr(store, "utc_now", lambda: "2001-01-01T00:00:00.000000Z")  # NTP, VM resume
        receipt = ledger.append({"kind": "reply-sent"})
    assert receipt.tree_head.head.time == last
    assert verify_ledger(folder).entries == 3


# --- the signed state -------------------------------------------------------------------------


def test_state_is_replaced_with_the_entry_and_signed_by_the_head(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l") as ledger:
        assert ledger.state() == {}
        ledger.append({"kind": "a"}, state={"bits": {"hospital-0": "7234"}, "halted": False, "round": 1})
        receipt = ledger.append({"kind": "b"})  # no state: the state is kept
        assert ledger.state() == {"bits": {"hospital-0": "7234"}, "halted": False, "round": 1}
        expected = sha256_hex(canonical_json(ledger.state()))
        assert receipt.tree_head.head.state_sha256 == expected
        ledger.append({"kind": "c"}, state={})
        assert ledger.state() == {}
    assert verify_ledger(tmp_path / "l").state_sha256 == sha256_hex(b"{}")


@pytest.mark.parametrize("state", [{"bits": 1.5}, {1: "x"}, ["not", "a", "dict"]])
def test_a_state_that_cannot_be_hashed_stably_is_refused_before_anything_is_written(
    tmp_path: Path, state: object
) -> None:
    with Ledger(tmp_path / "l") as ledger:
        with pytest.raises(LedgerError, match="cannot record"):
            ledger.append({"kind": "a"}, {"sent": b"x"}, state=state)  # type: ignore[arg-type]
        assert ledger.entries() == []
    assert not [p for p in (tmp_path / "l").rglob("*") if "blobs" in p.parts and p.is_file()]


def test_an_edited_state_is_refused_by_state_append_and_verify(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l") as ledger:
        ledger.append({"kind": "a"}, state={"halted": True, "bits": "9000"})
    with db(tmp_path / "l") as conn:  # the server's operator resets the budget
        conn.execute("UPDATE tip SET state = ? WHERE id = 0", (canonical_json({"halted": False, "bits": "0"}),))
    with Ledger(tmp_path / "l") as ledger:
        with pytest.raises(LedgerError, match="state is not the state the head signed"):
            ledger.state()
        with pytest.raises(LedgerError, match="state is not the state the head signed"):
            ledger.append({"kind": "b"})
    expect_broken(tmp_path / "l", None, "state is not the state the latest signed head commits to")


def test_a_state_reset_together_with_an_older_head_is_refused(tmp_path: Path) -> None:
    """Replay the head (and state) of an earlier point without truncating the entries."""
    with Ledger(tmp_path / "l") as ledger:
        ledger.append({"kind": "a"}, state={"bits": "0"})
        ledger.append({"kind": "b"}, state={"bits": "9000"})
    with db(tmp_path / "l") as conn:
        conn.execute("DELETE FROM tree_heads WHERE size = 2")
        conn.execute("UPDATE tip SET state = ? WHERE id = 0", (canonical_json({"bits": "0"}),))
    with Ledger(tmp_path / "l") as ledger, pytest.raises(LedgerError, match="does not match its latest signed head"):
        ledger.state()


# --- verify: tampers ----------------------------------------------------------------------------


def test_flipped_byte_in_an_entry(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    with db(folder) as conn:
        raw = bytearray(conn.execute("SELECT entry FROM entries WHERE seq = 2").fetchone()[0])
        raw[raw.index(b"entry 2")] ^= 0x01
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 2", (bytes(raw),))
    expect_broken(folder, 2, "do not match the signed tree head")


def test_flipped_byte_in_a_blob(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    blobs = sorted(p for p in (folder / "blobs").rglob("*") if p.is_file())
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


def test_truncation_that_also_drops_heads_is_caught_by_a_trusted_head(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    trusted = verify_ledger(folder).latest_head
    with db(folder) as conn:  # the one rollback no local check can see: entries, heads and tip together
        leaves = [merkle.leaf_hash(raw) for (raw,) in conn.execute("SELECT entry FROM entries WHERE seq < 3")]
        conn.execute("DELETE FROM entries WHERE seq >= 3")
        conn.execute("DELETE FROM tree_heads WHERE size > 3")
        conn.execute(
            "UPDATE tip SET size = 3, compact = ? WHERE id = 0", (CompactRange.from_leaves(leaves).to_bytes(),)
        )
    verify_ledger(folder)  # locally consistent: this is what a head kept elsewhere is for
    expect_broken(folder, 3, "no longer contains the trusted tree of size 5: it holds 3", trusted_head=trusted)
    for note in ("a", "b", "c"):  # and the node extends it past the trusted size: still caught
        append_one(folder, note)
    expect_broken(folder, None, "no longer contains the trusted tree of size 5: its first 5", trusted_head=trusted)


def test_a_trusted_head_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    intruder = create_signer(tmp_path / "intruder")
    head = verify_ledger(folder).latest_head.head
    forged = TreeHead(head.size, head.root, head.time, intruder.verifier.key_id, head.state_sha256)
    expect_broken(
        folder,
        None,
        "trusted tree head given does not verify",
        trusted_head=SignedTreeHead(forged, intruder.sign(forged.signed_bytes)),
    )


def test_tree_head_signed_by_another_key(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l")
    other = create_signer(tmp_path / "intruder")
    with Ledger(folder, create=False) as ledger:
        latest = ledger.latest_head()
    assert latest is not None
    for key_id in (latest.head.key_id, other.verifier.key_id):  # copied id, or its own
        head = TreeHead(latest.head.size, latest.head.root, latest.head.time, key_id, latest.head.state_sha256)
        forged = SignedTreeHead(head, other.sign(head.signed_bytes))
        with db(folder) as conn:
            conn.execute(
                "UPDATE tree_heads SET head = ?, signature = ? WHERE id = (SELECT MAX(id) FROM tree_heads)",
                (canonical_json(head.to_json()), forged.signature),
            )
        expect_broken(folder, None, "bad signature or another key")


def test_a_replaced_key_beside_the_ledger_is_caught_only_by_a_pin(tmp_path: Path) -> None:
    """The whole ledger re-signed under the intruder's key, and its public key put beside it:
    unpinned it verifies (and says pinned=False); pinned by fingerprint or key, it does not."""
    folder = make_ledger(tmp_path / "l")
    honest_fingerprint = verify_ledger(folder).key_id
    honest_key = (folder / "signing.pub").read_bytes()
    forged = make_ledger(tmp_path / "forged")  # same shape, intruder's key
    shutil.rmtree(folder)
    shutil.copytree(forged, folder)
    assert not verify_ledger(folder).pinned
    expect_broken(folder, None, "not the pinned", pinned_fingerprint=honest_fingerprint)
    expect_broken(folder, None, "bad signature or another key", public_key=honest_key)


def test_an_unreadable_pin_is_the_callers_error(tmp_path: Path) -> None:
    folder = make_ledger(tmp_path / "l", 1)
    with pytest.raises(LedgerError, match="not a key fingerprint"):
        verify_ledger(folder, pinned_fingerprint="abc")
    with pytest.raises(LedgerError, match="cannot read the public key"):
        verify_ledger(folder, public_key=tmp_path / "nope.pub")


def test_concurrent_creators_and_appenders_share_one_key_and_one_history(tmp_path: Path) -> None:
    """Several connections (as several processes would) create the same ledger at once and
    append with state updates: one key, one creation, every append kept, the ledger verifies."""
    folder = tmp_path / "l"
    barrier = threading.Barrier(4)
    created: list[bool] = []
    fingerprints: set[str] = set()

    def worker(index: int) -> None:
        barrier.wait()
        with Ledger(folder) as ledger:
            created.append(ledger.created)
            fingerprints.add(ledger.fingerprint)
            for i in range(5):
                ledger.append(
                    {"kind": "reply-sent", "worker": index, "i": i},
                    {"sent": f"{index}/{i}".encode()},
                    state={"last": index},
                )

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(created) == [False, False, False, True] and len(fingerprints) == 1
    result = verify_ledger(folder, pinned_fingerprint=fingerprints.pop())
    assert result.entries == 20
    with Ledger(folder, create=False) as ledger:
        assert ledger.state() == {"last": ledger.entries()[-1]["worker"]}


def test_a_ledger_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for folder in (tmp_path / "file", tmp_path / "file" / "under"):
        with pytest.raises(LedgerError, match="cannot"):
            Ledger(folder)
