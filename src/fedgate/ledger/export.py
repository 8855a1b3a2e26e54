"""An export bundle for an external auditor: a consistent copy of the entries, the blobs
they name and the public key, never the private key."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from fedgate.errors import LedgerError
from fedgate.ledger.signing import PUBLIC_KEY_FILE
from fedgate.ledger.store import BLOB_DIR, DB_FILE, Ledger


def export_bundle(folder: Path, out: Path) -> int:
    """Copy the ledger at `folder` into `out` (which must not exist). Returns the entry count."""
    if out.exists():
        raise LedgerError(f"{out} already exists; choose a new folder for the bundle")
    with Ledger(folder, create=False) as ledger:
        public = folder / PUBLIC_KEY_FILE
        if not public.is_file():
            raise LedgerError(f"{public} is missing; cannot export without the public key")
        out.mkdir(parents=True)
        target = sqlite3.connect(out / DB_FILE)
        try:
            ledger.db.backup(target)  # a consistent snapshot even while a node appends
        finally:
            target.close()
        shutil.copy2(public, out / PUBLIC_KEY_FILE)
        entries = ledger.entries()
        for entry in entries:
            for blob in entry.get("payloads", {}).values():
                source = ledger.blobs.path(blob["sha256"])
                dest = out / BLOB_DIR / blob["sha256"][:2] / blob["sha256"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    shutil.copy2(source, dest)
        head = ledger.latest_head()
        (out / "tree_head.json").write_text(json.dumps(head.to_json() if head else None, indent=2) + "\n")
    return len(entries)
