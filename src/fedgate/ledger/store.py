"""The append-only ledger of one hospital: entries in SQLite, payloads in a content-addressed
blob store, a signed RFC 9162 tree head after every append.

Write-ahead contract: `append` returns only once the payload blobs (file and directory),
the entry and its signed tree head are on disk (fsync; SQLite WAL with synchronous=FULL).
Callers hand a payload on only after `append` returned; if it raises, nothing is sent.

Append-only, checked at every append: the `tip` row keeps the tree's compact range (its
O(log n) perfect-subtree roots) and the state document. An append first checks that the
latest signed head verifies under the hospital's key and commits to exactly that compact
range, that state and that many entries, then extends the range by one leaf and signs the
new head, all in one SQLite transaction. So a history rewritten without the key (entries,
leaf hashes, heads deleted) is refused, not re-signed, and no append re-reads old leaves.
What no local check can see is a rollback of everything (entries, heads, tip) to an earlier
consistent point: `verify --trusted-head` with a head kept elsewhere (a report) catches it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

from fedgate.canonical import canonical_json
from fedgate.errors import LedgerError
from fedgate.ledger import crashpoints, merkle
from fedgate.ledger.blobs import CHUNK, PARALLEL_HASH_BYTES, BlobStore
from fedgate.ledger.compact import EMPTY_ROOT, CompactRange
from fedgate.ledger.formats import (
    EMPTY_STATE,
    FormatError,
    SignedTreeHead,
    TreeHead,
    parse_head_row,
    parse_state,
    sha256_hex,
    state_bytes,
    utc_now,
)
from fedgate.ledger.signing import Signer, Verifier, create_signer, load_signer

__all__ = [
    "BLOB_DIR",
    "CHUNK",
    "DB_FILE",
    "PARALLEL_HASH_BYTES",
    "BlobStore",
    "Ledger",
    "Receipt",
    "SignedTreeHead",
    "Snapshot",
    "TreeHead",
    "read_snapshot",
    "utc_now",
]

DB_FILE = "ledger.sqlite"
BLOB_DIR = "blobs"

# Each statement alone: executescript() would commit the creating transaction half-way.
SCHEMA = (
    "CREATE TABLE entries (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL)",
    "CREATE TABLE tree_heads (id INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL, "
    "head BLOB NOT NULL, signature BLOB NOT NULL)",
    # One row: the tree at its latest head (compact range) and the state that head commits to.
    "CREATE TABLE tip (id INTEGER PRIMARY KEY CHECK (id = 0), size INTEGER NOT NULL, "
    "compact BLOB NOT NULL, state BLOB NOT NULL)",
)


@dataclass(frozen=True)
class Receipt:
    seq: int
    leaf_hash: bytes
    tree_head: SignedTreeHead


@dataclass(frozen=True)
class Snapshot:
    """Every row of a ledger database exactly as stored, read in one transaction; nothing
    parsed (the verifier parses, strictly)."""

    entries: list[tuple[Any, ...]]
    heads: list[tuple[Any, ...]]
    tips: list[tuple[Any, ...]]


def read_snapshot(db_path: Path) -> Snapshot:
    """Read a ledger database read-only, in one transaction (a consistent view even while a
    node appends). LedgerError when it is not a readable ledger database."""
    if not db_path.is_file():
        raise LedgerError(f"{db_path.parent} holds no ledger ({DB_FILE} is missing)")
    try:
        conn = sqlite3.connect(f"file:{quote(str(db_path.resolve()))}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute("BEGIN")
            entries = conn.execute("SELECT seq, entry FROM entries ORDER BY seq").fetchall()
            heads = conn.execute("SELECT size, head, signature FROM tree_heads ORDER BY id").fetchall()
            tips = conn.execute("SELECT id, size, compact, state FROM tip").fetchall()
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise LedgerError(f"cannot read the ledger database {db_path}: {err}") from err
    return Snapshot(entries, heads, tips)


@dataclass(frozen=True)
class _Tip:
    head: SignedTreeHead
    compact: CompactRange
    state: bytes


class Ledger:
    """One hospital's ledger folder. Open it where you append or read; it is safe to open the
    same folder from several processes (appends are serialised by SQLite's write lock).

    `create=True` makes a brand-new ledger (its key, its empty signed head) when the folder
    holds none yet; `created` then says so and `fingerprint` is the key to publish. An
    existing ledger is never given a new key."""

    def __init__(self, folder: Path, create: bool = True) -> None:
        self.folder = Path(folder)
        self.created = False
        self._signer: Signer | None = None
        db_path = self.folder / DB_FILE
        if not create and not db_path.is_file():
            raise LedgerError(f"{self.folder} holds no ledger ({DB_FILE} is missing)")
        if create:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise LedgerError(f"cannot create the ledger folder {self.folder}: {err}") from err
        self.blobs = BlobStore(self.folder / BLOB_DIR)
        try:
            self.db = sqlite3.connect(db_path, isolation_level=None, timeout=60)
        except sqlite3.Error as err:
            raise LedgerError(f"cannot open the ledger database in {self.folder}: {err}") from err
        try:
            self.db.execute("PRAGMA synchronous=FULL")
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "tip" not in tables:
                if tables - {"sqlite_sequence"}:
                    raise LedgerError(
                        f"{db_path} is not a ledger this fedgate can read or extend (it has no tip table: written "
                        "by an older fedgate, or damaged). Keep it as evidence; start a new ledger folder."
                    )
                if not create:
                    raise LedgerError(f"{self.folder} holds no ledger ({DB_FILE} is empty)")
                self._create()
        except sqlite3.Error as err:
            self.db.close()
            raise LedgerError(f"cannot open the ledger database in {self.folder}: {err}") from err
        except BaseException:
            self.db.close()
            raise

    def _create(self) -> None:
        """Key first (reused if a crashed creation left one), then schema, tip and an empty
        signed head in one transaction: a ledger always has a head to check appends against."""
        try:
            signer = create_signer(self.folder)
        except FileExistsError:  # left by a creation that crashed before its commit, or a racing creator
            signer = load_signer(self.folder)
        except OSError as err:
            raise LedgerError(f"cannot create the signing key in {self.folder}: {err}") from err
        self._signer = signer
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tip'").fetchone():
                self.db.execute("COMMIT")  # another process created it first
                return
            for statement in SCHEMA:
                self.db.execute(statement)
            self.db.execute("INSERT INTO tip (id, size, compact, state) VALUES (0, 0, ?, ?)", (b"", EMPTY_STATE))
            head = TreeHead(0, EMPTY_ROOT, utc_now(), signer.verifier.key_id, sha256_hex(EMPTY_STATE))
            self._insert_head(SignedTreeHead(head, signer.sign(head.signed_bytes)))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.created = True

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = load_signer(self.folder)
        return self._signer

    @property
    def fingerprint(self) -> str:
        """The signing key's fingerprint (SHA-256 of the raw public key): what the hospital
        publishes so that readers can pin it."""
        return self.signer.verifier.key_id

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self,
        fields: Mapping[str, Any],
        payloads: Mapping[str, bytes | memoryview] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Receipt:
        """Record one event durably. `fields` must be canonical-JSON-safe; `seq`, `time` and
        `payloads` (name -> sha256, size) are added here, inside the leaf. `state`, when given,
        replaces the ledger's state document in the same transaction; the new head signs it.

        Refuses (LedgerError, nothing written to the database) when the ledger no longer
        matches its latest signed head."""
        reserved = {"seq", "time", "payloads"} & set(fields)
        if reserved:
            raise LedgerError(f"entry fields {sorted(reserved)} are set by the ledger")
        try:
            canonical_json(dict(fields))
            new_state = None if state is None else state_bytes(dict(state))
        except (TypeError, ValueError) as err:
            raise LedgerError(f"cannot record this entry: {err}") from err
        signer = self.signer
        verifier = signer.verifier
        described = {
            name: {"sha256": self.blobs.put(data), "size": len(data)} for name, data in (payloads or {}).items()
        }
        crashpoints.reached("after-blob-rename")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                tip = self._checked_tip(verifier)
                time = max(utc_now(), tip.head.head.time)  # an honest clock step back must not break order
                seq = tip.compact.size
                entry = canonical_json({**fields, "seq": seq, "time": time, "payloads": described})
                leaf = merkle.leaf_hash(entry)
                grown = tip.compact.append(leaf)
                kept = tip.state if new_state is None else new_state
                head = TreeHead(grown.size, grown.root(), time, verifier.key_id, sha256_hex(kept))
                signed = SignedTreeHead(head, signer.sign(head.signed_bytes))
                self.db.execute("INSERT INTO entries (seq, entry) VALUES (?, ?)", (seq, entry))
                self._insert_head(signed)
                self.db.execute(
                    "UPDATE tip SET size = ?, compact = ?, state = ? WHERE id = 0", (grown.size, grown.to_bytes(), kept)
                )
                crashpoints.reached("before-commit")
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise LedgerError(f"cannot append to the ledger in {self.folder}: {err}") from err
        crashpoints.reached("after-commit")
        return Receipt(seq, leaf, signed)

    def state(self, verifier: Verifier | None = None) -> dict[str, Any]:
        """The current state document, in O(log n): only after checking that the latest
        signed head (under this ledger's own key, or `verifier`) commits to it."""
        verifier = verifier or self.signer.verifier
        try:
            self.db.execute("BEGIN")
            try:
                tip = self._checked_tip(verifier)
            finally:
                self.db.execute("COMMIT")
        except sqlite3.Error as err:
            raise LedgerError(f"cannot read the ledger's state in {self.folder}: {err}") from err
        try:
            return parse_state(tip.state)
        except FormatError as err:  # hashed and signed, yet malformed: only a bug writes that
            raise LedgerError(f"the ledger's state is not a JSON object: {err}") from err

    def _checked_tip(self, verifier: Verifier) -> _Tip:
        """The tip, once it agrees with the latest signed head. O(log n): one signature, the
        compact range's roots, two index look-ups. Call inside a transaction."""
        row = self.db.execute("SELECT size, head, signature FROM tree_heads ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            self._refuse("it has no signed tree head")
        try:
            head = parse_head_row(row, what="the latest signed tree head")
        except FormatError as err:
            self._refuse(str(err))
        if not head.verify(verifier):
            self._refuse("the latest tree head's signature does not verify under the ledger's key")
        tip = self.db.execute("SELECT size, compact, state FROM tip WHERE id = 0").fetchone()
        if tip is None:
            self._refuse("its compact range is missing")
        size, compact_bytes, state = tip
        if type(size) is not int or size != head.head.size or not isinstance(compact_bytes, bytes):
            self._refuse(f"the stored compact range covers {size!r:.20} entries, the signed head {head.head.size}")
        try:
            compact = CompactRange.from_bytes(size, compact_bytes)
        except ValueError as err:
            self._refuse(f"the stored compact range is malformed: {err}")
        if compact.root() != head.head.root:
            self._refuse("the stored compact range's root is not the signed root")
        if not isinstance(state, bytes) or sha256_hex(state) != head.head.state_sha256:
            self._refuse("the stored state is not the state the head signed")
        first, last = self.db.execute(
            "SELECT (SELECT MIN(seq) FROM entries), (SELECT MAX(seq) FROM entries)"
        ).fetchone()
        if (first, last) != ((None, None) if size == 0 else (0, size - 1)):
            self._refuse(f"it holds entries {first}..{last} but its signed head covers {size}")
        return _Tip(head, compact, state)

    def _refuse(self, why: str) -> NoReturn:
        raise LedgerError(
            f"the ledger in {self.folder} does not match its latest signed head ({why}): rewritten or truncated; "
            f"nothing was appended. Run `fedgate ledger verify {self.folder}`"
        )

    def _insert_head(self, signed: SignedTreeHead) -> None:
        self.db.execute(
            "INSERT INTO tree_heads (size, head, signature) VALUES (?, ?, ?)",
            (signed.head.size, canonical_json(signed.head.to_json()), signed.signature),
        )

    def raw_entries(self) -> Iterator[tuple[int, bytes]]:
        for seq, entry in self.db.execute("SELECT seq, entry FROM entries ORDER BY seq"):
            if not isinstance(entry, bytes):
                raise LedgerError(f"entry {seq} is not stored as bytes; run `fedgate ledger verify {self.folder}`")
            yield int(seq), entry

    def entries(self) -> list[dict[str, Any]]:
        result = []
        for seq, raw in self.raw_entries():
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError) as err:
                raise LedgerError(f"entry {seq} is not JSON; run `fedgate ledger verify {self.folder}`") from err
            if not isinstance(entry, dict):
                raise LedgerError(f"entry {seq} is not a JSON object; run `fedgate ledger verify {self.folder}`")
            result.append(entry)
        return result

    def leaf_hashes(self) -> list[bytes]:
        return [merkle.leaf_hash(entry) for _, entry in self.raw_entries()]

    def tree_heads(self) -> list[SignedTreeHead]:
        rows = self.db.execute("SELECT size, head, signature FROM tree_heads ORDER BY id").fetchall()
        return [self._parse_head(row, f"tree head #{index}") for index, row in enumerate(rows)]

    def latest_head(self) -> SignedTreeHead | None:
        """The latest head as stored (parsed, signature not checked: use `verify_ledger`)."""
        row = self.db.execute("SELECT size, head, signature FROM tree_heads ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else self._parse_head(row, "the latest tree head")

    def _parse_head(self, row: tuple[Any, ...], what: str) -> SignedTreeHead:
        try:
            return parse_head_row(row, what=what)
        except FormatError as err:
            raise LedgerError(f"{err}; run `fedgate ledger verify {self.folder}`") from err
