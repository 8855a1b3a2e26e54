"""An export bundle for an external auditor: a consistent copy of the entries, heads and
state, the blobs they name and the public key, never the private key.

Everything but the blob bytes is read from the snapshot (the bundle's own database), never
from the live ledger after it: a node appending meanwhile cannot make the bundle's entries,
blob list and tree head disagree. Blobs are content-addressed and never rewritten, so
copying the ones the snapshot names gives the snapshot's blobs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from fedgate.errors import LedgerError
from fedgate.ledger.formats import FormatError, parse_entry, parse_head_row
from fedgate.ledger.signing import PUBLIC_KEY_FILE
from fedgate.ledger.store import BLOB_DIR, DB_FILE, Ledger, read_snapshot

HEAD_FILE = "tree_head.json"


def _snapshot(ledger: Ledger, target: Path) -> None:
    """SQLite's online backup: one consistent copy, even while a node appends."""
    conn = sqlite3.connect(target)
    try:
        ledger.db.backup(conn)
    finally:
        conn.close()


def export_bundle(folder: Path, out: Path) -> int:
    """Copy the ledger at `folder` into `out` (which must not exist). Returns the entry count.
    Blobs the snapshot names but the store lacks are left out (the bundle then does not verify,
    which is what an auditor should see)."""
    folder, out = Path(folder), Path(out)
    if out.exists():
        raise LedgerError(f"{out} already exists; choose a new folder for the bundle")
    public = folder / PUBLIC_KEY_FILE
    with Ledger(folder, create=False) as ledger:
        if not public.is_file():
            raise LedgerError(f"{public} is missing; cannot export without the public key")
        out.mkdir(parents=True)
        _snapshot(ledger, out / DB_FILE)
    shutil.copy2(public, out / PUBLIC_KEY_FILE)
    snapshot = read_snapshot(out / DB_FILE)
    for index, (_, raw) in enumerate(snapshot.entries):
        try:
            entry = parse_entry(raw, index)
        except FormatError:
            continue  # copied as stored; `verify` on the bundle names it
        for payload in entry.payloads.values():  # digests checked: 64 lowercase hex
            source = folder / BLOB_DIR / payload.sha256[:2] / payload.sha256
            dest = out / BLOB_DIR / payload.sha256[:2] / payload.sha256
            if dest.exists() or not source.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    head = None
    if snapshot.heads:
        try:
            head = parse_head_row(snapshot.heads[-1], what="the latest tree head").to_json()
        except FormatError:
            head = None
    (out / HEAD_FILE).write_text(json.dumps(head, indent=2) + "\n")
    return len(snapshot.entries)
