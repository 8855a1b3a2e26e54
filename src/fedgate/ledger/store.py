"""The append-only ledger of one hospital: entries in SQLite, payloads in a content-addressed
blob store, a signed RFC 9162 tree head after every append.

Write-ahead contract: `append` returns only once the payload blobs (file and directory),
the entry and its signed tree head are on disk (fsync; SQLite WAL with synchronous=FULL).
Callers hand a payload on only after `append` returned; if it raises, nothing is sent."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedgate.canonical import canonical_json
from fedgate.errors import LedgerError
from fedgate.ledger import merkle
from fedgate.ledger.signing import Signer, Verifier, fsync_dir, load_or_create_signer

DB_FILE = "ledger.sqlite"
BLOB_DIR = "blobs"
CHUNK = 1 << 20  # writes of 1 MiB: measured faster here than one huge write (page-cache throttling)
PARALLEL_HASH_BYTES = 1 << 24

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    leaf_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tree_heads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    size INTEGER NOT NULL,
    head BLOB NOT NULL,
    signature BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class TreeHead:
    size: int
    root: bytes
    time: str
    key_id: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root.hex(), "time": self.time, "key_id": self.key_id}

    @property
    def signed_bytes(self) -> bytes:
        return canonical_json({"fedgate-tree-head": 1, **self.to_json()})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TreeHead:
        return cls(int(data["size"]), bytes.fromhex(data["root"]), str(data["time"]), str(data["key_id"]))


@dataclass(frozen=True)
class SignedTreeHead:
    head: TreeHead
    signature: bytes

    def verify(self, verifier: Verifier) -> bool:
        return self.head.key_id == verifier.key_id and verifier.verify(self.signature, self.head.signed_bytes)

    def to_json(self) -> dict[str, Any]:
        return {**self.head.to_json(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedTreeHead:
        return cls(TreeHead.from_json(data), bytes.fromhex(data["signature"]))


@dataclass(frozen=True)
class Receipt:
    seq: int
    leaf_hash: bytes
    tree_head: SignedTreeHead


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class BlobStore:
    """Payloads named by the SHA-256 of their exact bytes: `blobs/ab/abcdef...`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / digest

    def put(self, data: bytes | memoryview) -> str:
        """Hash and write, fsync the file, rename into place, fsync the folder.

        Large payloads are hashed on a second thread while this one writes (hashlib and
        os.write both release the GIL), so an append costs max(hash, write) + fsync."""
        view = memoryview(data).cast("B")
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        hasher = threading.Thread(target=digest.update, args=(view,)) if len(view) >= PARALLEL_HASH_BYTES else None
        if hasher is not None:
            hasher.start()
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb", buffering=0) as handle:
                for start in range(0, len(view), CHUNK):
                    handle.write(view[start : start + CHUNK])
                os.fsync(handle.fileno())
            if hasher is not None:
                hasher.join()
            else:
                digest.update(view)
            name = digest.hexdigest()
            final = self.path(name)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            fsync_dir(self.folder)
            return name
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        if not path.is_file():
            raise LedgerError(f"blob {digest} is missing from {self.folder}")
        return path.read_bytes()

    def digest_of(self, digest: str) -> str | None:
        """SHA-256 of the stored file (None when missing), to check it still matches its name."""
        path = self.path(digest)
        if not path.is_file():
            return None
        h = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                h.update(block)
        return h.hexdigest()


class Ledger:
    """One hospital's ledger folder. Open it where you append or read; it is safe to open the
    same folder from several processes (appends are serialised by SQLite's write lock)."""

    def __init__(self, folder: Path, create: bool = True) -> None:
        self.folder = Path(folder)
        if not create and not (self.folder / DB_FILE).is_file():
            raise LedgerError(f"{self.folder} holds no ledger ({DB_FILE} is missing)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.folder / BLOB_DIR)
        try:
            self.db = sqlite3.connect(self.folder / DB_FILE, isolation_level=None, timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"cannot open the ledger database in {self.folder}: {err}") from err
        self._signer: Signer | None = None

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = load_or_create_signer(self.folder)
        return self._signer

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, fields: Mapping[str, Any], payloads: Mapping[str, bytes] | None = None) -> Receipt:
        """Record one event durably. `fields` must be canonical-JSON-safe; `seq`, `time` and
        `payloads` (name -> sha256, size) are added here, inside the leaf."""
        reserved = {"seq", "time", "payloads"} & set(fields)
        if reserved:
            raise LedgerError(f"entry fields {sorted(reserved)} are set by the ledger")
        signer = self.signer
        described = {
            name: {"sha256": self.blobs.put(data), "size": len(data)} for name, data in (payloads or {}).items()
        }
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                leaves = [bytes(row[0]) for row in self.db.execute("SELECT leaf_hash FROM entries ORDER BY seq")]
                seq = len(leaves)
                entry = canonical_json({**fields, "seq": seq, "time": utc_now(), "payloads": described})
                leaf = merkle.leaf_hash(entry)
                leaves.append(leaf)
                head = TreeHead(len(leaves), merkle.root(leaves), utc_now(), signer.verifier.key_id)
                signed = SignedTreeHead(head, signer.sign(head.signed_bytes))
                self.db.execute("INSERT INTO entries (seq, entry, leaf_hash) VALUES (?, ?, ?)", (seq, entry, leaf))
                self.db.execute(
                    "INSERT INTO tree_heads (size, head, signature) VALUES (?, ?, ?)",
                    (head.size, canonical_json(head.to_json()), signed.signature),
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"cannot append to the ledger in {self.folder}: {err}") from err
        return Receipt(seq, leaf, signed)

    def raw_entries(self) -> Iterator[tuple[int, bytes]]:
        for seq, entry in self.db.execute("SELECT seq, entry FROM entries ORDER BY seq"):
            yield int(seq), bytes(entry)

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(entry) for _, entry in self.raw_entries()]

    def leaf_hashes(self) -> list[bytes]:
        return [merkle.leaf_hash(entry) for _, entry in self.raw_entries()]

    def tree_heads(self) -> list[SignedTreeHead]:
        rows = self.db.execute("SELECT head, signature FROM tree_heads ORDER BY id")
        return [SignedTreeHead(TreeHead.from_json(json.loads(head)), bytes(sig)) for head, sig in rows]

    def latest_head(self) -> SignedTreeHead | None:
        heads = self.tree_heads()
        return heads[-1] if heads else None
