"""The review queue of one hospital, persisted in SQLite beside its ledger.

One item per instruction (the instruction's message id is the key), so a node that
restarts while a reply is pending finds the same item again instead of asking twice.
The web page writes decisions here; the gate pipeline, the ledger's only writer, records
them in the ledger before the reply moves on."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgate.errors import FedgateError
from fedgate.ledger.store import utc_now

QUEUE_FILE = "review.sqlite"
PENDING, APPROVED, REJECTED, EXPIRED = "pending", "approved", "rejected", "expired"

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instruction_id TEXT NOT NULL UNIQUE,
    hospital TEXT NOT NULL,
    created TEXT NOT NULL,
    deadline REAL NOT NULL,
    summary TEXT NOT NULL,
    payload BLOB NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    reviewer TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    decided_at TEXT NOT NULL DEFAULT ''
);
"""


class ReviewError(FedgateError):
    """The review queue cannot be read or written, or a decision is not possible."""


@dataclass(frozen=True)
class ReviewItem:
    id: int
    instruction_id: str
    hospital: str
    created: str
    deadline: float
    summary: dict[str, Any]
    payload: bytes
    status: str
    reviewer: str
    reason: str
    decided_at: str

    @property
    def payload_sha256(self) -> str:
        """Of the payload as the queue holds it now (the page checks it against the ledger)."""
        return hashlib.sha256(self.payload).hexdigest()

    @property
    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.time())


class ReviewQueue:
    def __init__(self, hospital_dir: Path) -> None:
        self.path = Path(hospital_dir) / QUEUE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ReviewError(f"cannot open the review queue {self.path}: {err}") from err

    def close(self) -> None:
        self.db.close()

    def submit(
        self, instruction_id: str, hospital: str, summary: dict[str, Any], payload: bytes, timeout_s: float
    ) -> ReviewItem:
        """Hold a reply for review; if this instruction already has an item (the node
        restarted), return that one unchanged."""
        self.db.execute(
            "INSERT OR IGNORE INTO items (instruction_id, hospital, created, deadline, summary, payload) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                instruction_id,
                hospital,
                utc_now(),
                time.time() + timeout_s,
                json.dumps(summary, sort_keys=True),
                payload,
            ),
        )
        item = self.by_instruction(instruction_id)
        assert item is not None
        return item

    def _row(self, row: tuple[Any, ...] | None) -> ReviewItem | None:
        if row is None:
            return None
        return ReviewItem(
            int(row[0]),
            row[1],
            row[2],
            row[3],
            float(row[4]),
            json.loads(row[5]),
            bytes(row[6]),
            row[7],
            row[8],
            row[9],
            row[10],
        )

    _COLUMNS = "id, instruction_id, hospital, created, deadline, summary, payload, status, reviewer, reason, decided_at"

    def get(self, item_id: int) -> ReviewItem | None:
        return self._row(self.db.execute(f"SELECT {self._COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone())

    def by_instruction(self, instruction_id: str) -> ReviewItem | None:
        query = f"SELECT {self._COLUMNS} FROM items WHERE instruction_id = ?"
        return self._row(self.db.execute(query, (instruction_id,)).fetchone())

    def items(self, status: str | None = None) -> list[ReviewItem]:
        if status is None:
            rows = self.db.execute(f"SELECT {self._COLUMNS} FROM items ORDER BY id DESC")
        else:
            rows = self.db.execute(f"SELECT {self._COLUMNS} FROM items WHERE status = ? ORDER BY id", (status,))
        return [item for row in rows if (item := self._row(row)) is not None]

    def decide(self, item_id: int, approve: bool, reviewer: str, reason: str) -> ReviewItem:
        """Record a person's decision. Only a pending, unexpired item can be decided."""
        if not reviewer.strip():
            raise ReviewError("a decision needs the reviewer's name")
        cursor = self.db.execute(
            "UPDATE items SET status = ?, reviewer = ?, reason = ?, decided_at = ? "
            "WHERE id = ? AND status = 'pending' AND deadline > ?",
            (APPROVED if approve else REJECTED, reviewer.strip(), reason.strip(), utc_now(), item_id, time.time()),
        )
        item = self.get(item_id)
        if item is None:
            raise ReviewError(f"no review item {item_id}")
        if cursor.rowcount != 1:
            state = item.status if item.status != PENDING else "past its deadline"
            raise ReviewError(f"item {item_id} is {state}; it cannot be decided now")
        return item

    def expire(self, item_id: int) -> ReviewItem:
        """Mark a pending item whose deadline passed as expired (it is then refused)."""
        self.db.execute(
            "UPDATE items SET status = 'expired', decided_at = ? WHERE id = ? AND status = 'pending' AND deadline <= ?",
            (utc_now(), item_id, time.time()),
        )
        item = self.get(item_id)
        assert item is not None
        return item

    def wait(self, item_id: int, poll_s: float = 0.25) -> ReviewItem:
        """Block until the item is decided or expires."""
        while True:
            item = self.get(item_id)
            if item is None:
                raise ReviewError(f"review item {item_id} vanished from {self.path}")
            if item.status != PENDING:
                return item
            if item.deadline <= time.time():
                return self.expire(item_id)
            time.sleep(poll_s)
