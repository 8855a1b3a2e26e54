"""Payloads named by the SHA-256 of their exact bytes: `blobs/ab/abcdef...`.

Only digests that are 64 lowercase hex characters become paths, whatever a ledger holds."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from fedgate.errors import LedgerError
from fedgate.ledger import crashpoints
from fedgate.ledger.formats import FormatError, check_digest
from fedgate.ledger.signing import fsync_dir

CHUNK = 1 << 20  # writes of 1 MiB: measured faster here than one huge write (page-cache throttling)
PARALLEL_HASH_BYTES = 1 << 24
INCOMING_PREFIX = ".incoming-"


class BlobStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, digest: str) -> Path:
        try:
            check_digest(digest, "blob name")
        except FormatError as err:
            raise LedgerError(str(err)) from err
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
        crashpoints.reached("before-blob-write")
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=INCOMING_PREFIX)
        try:
            with os.fdopen(fd, "wb", buffering=0) as handle:
                _write_all(handle.fileno(), view[:CHUNK])
                crashpoints.reached("in-blob-write")  # once per blob, not per chunk
                for start in range(CHUNK, len(view), CHUNK):
                    _write_all(handle.fileno(), view[start : start + CHUNK])
                os.fsync(handle.fileno())
                # durable now: its pages need not stay cached. Left cached, every blob takes pages
                # the kernel has not handed out before, which cost ~4 ms per MB to fault in on
                # this VM (`benchmarks/gate_cost.py`), and evicts pages the hospital reads (images)
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if hasher is not None:
                hasher.join()
            else:
                digest.update(view)
            crashpoints.reached("after-blob-fsync")
            name = digest.hexdigest()
            final = self.path(name)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            fsync_dir(self.folder)
            return name
        except BaseException:
            if hasher is not None and hasher.is_alive():
                hasher.join()
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


def _write_all(fd: int, chunk: memoryview) -> None:
    """os.write may write less than asked (a signal, a full disk): write the rest."""
    while chunk:
        chunk = chunk[os.write(fd, chunk) :]
