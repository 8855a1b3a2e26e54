"""What the reviewer decides on is bytes: the page shows the SHA-256 of the exact payload that
approval would send and checks it against the gate's own record of what it held (the ledger's
`review-held` entry and its blob). The queue is a file anyone with access to the hospital
folder can edit, so the page never takes its word for what the payload is."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedgate.errors import LedgerError
from fedgate.flower_adapter import recorddict_from_bytes
from fedgate.gate.entries import KIND_REVIEW_HELD, ReviewEntry, read_entries
from fedgate.ledger.store import DB_FILE, Ledger
from fedgate.review.queue import ReviewItem

LEDGER_DIR = "ledger"

HELD = "held"  # the gate held exactly these bytes, and its blob still holds them
NOT_HELD = "not-held"  # no review-held entry of this instruction has this hash: the queue was edited
BLOB_ALTERED = "blob-altered"  # the entry matches, but the ledger's copy of the bytes no longer does
NO_LEDGER = "no-ledger"  # nothing to check against (or the ledger cannot be read)


@dataclass(frozen=True)
class HeldCheck:
    status: str
    sha256: str  # of the queue's payload: what approval would send
    size: int
    ledger_seq: int | None = None  # the review-held entry that matches
    detail: str = ""

    @property
    def approvable(self) -> bool:
        return self.status == HELD


@dataclass(frozen=True)
class TensorView:
    record: str
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class PayloadView:
    """The payload as decoded from its bytes (not from the queue's summary)."""

    tensors: tuple[TensorView, ...] = ()
    metrics: tuple[tuple[str, str], ...] = ()
    other_records: tuple[str, ...] = ()  # anything but the model and the metrics: never expected
    error: str = ""


def check_held(hospital_dir: Path, item: ReviewItem) -> HeldCheck:
    """Is the item's payload one the gate held for this instruction, byte for byte?"""
    digest = hashlib.sha256(item.payload).hexdigest()
    folder = Path(hospital_dir) / LEDGER_DIR
    if not (folder / DB_FILE).is_file():
        return HeldCheck(NO_LEDGER, digest, len(item.payload), detail=f"no ledger in {folder}")
    try:
        with Ledger(folder, create=False) as ledger:
            held = [
                e
                for e in read_entries(ledger)
                if isinstance(e, ReviewEntry) and e.kind == KIND_REVIEW_HELD and e.instruction_id == item.instruction_id
            ]
            match = next((e for e in held if e.payload_sha256 == digest), None)
            if match is None:
                known = ", ".join(e.payload_sha256[:16] for e in held) or "none"
                return HeldCheck(NOT_HELD, digest, len(item.payload), detail=f"held for this instruction: {known}")
            stored = ledger.blobs.get(digest)
    except LedgerError as err:
        return HeldCheck(NO_LEDGER, digest, len(item.payload), detail=str(err))
    if hashlib.sha256(stored).hexdigest() != digest:
        return HeldCheck(BLOB_ALTERED, digest, len(item.payload), match.seq, "the blob file's bytes have another hash")
    return HeldCheck(HELD, digest, len(item.payload), match.seq)


def describe_payload(payload: bytes) -> PayloadView:
    """Tensor names, shapes and dtypes and the metric values, read from the bytes themselves."""
    try:
        content = recorddict_from_bytes(payload)
    except ValueError as err:
        return PayloadView(error=str(err))
    tensors: list[TensorView] = []
    for key, record in content.array_records.items():
        for name, array in record.items():
            tensors.append(TensorView(str(key), str(name), tuple(int(n) for n in array.shape), str(array.dtype)))
    metrics: list[tuple[str, str]] = []
    for metric_record in content.metric_records.values():
        metrics += [(str(k), str(v)) for k, v in metric_record.items()]
    known = set(content.array_records) | set(content.metric_records)
    others = tuple(sorted(str(k) for k in content if k not in known))
    return PayloadView(tuple(tensors), tuple(metrics), others)
