"""Check a ledger from its bytes alone: every entry, every blob, the tree, every signed tree
head and the state. Nothing stored is trusted: leaf hashes and roots are recomputed.

Total: whatever bytes the folder holds, the answer is a `VerifyResult` or a
`LedgerVerificationError` saying "does not verify at entry N: why" (or at the tree heads),
never another exception. The key is pinned by the caller (`public_key` and/or
`pinned_fingerprint`); without either the key beside the ledger is used and the result says
`pinned=False`, for the caller to say so loudly."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger import merkle
from fedgate.ledger.blobs import CHUNK
from fedgate.ledger.compact import EMPTY_ROOT, CompactRange
from fedgate.ledger.formats import (
    Entry,
    FormatError,
    SignedTreeHead,
    parse_entry,
    parse_head_row,
    parse_state,
    sha256_hex,
)
from fedgate.ledger.signing import PUBLIC_KEY_FILE, Verifier, parse_fingerprint
from fedgate.ledger.store import BLOB_DIR, DB_FILE, Snapshot, read_snapshot


@dataclass(frozen=True)
class VerifyResult:
    entries: int
    tree_heads: int
    root: str
    key_id: str
    pinned: bool  # False: checked against the key found beside the ledger (say so)
    latest_head: SignedTreeHead  # what a reader keeps, to pass as the next trusted head
    state_sha256: str


def at_entry(seq: int, why: str) -> NoReturn:
    raise LedgerVerificationError(f"the ledger does not verify at entry {seq}: {why}", seq)


def at_heads(why: str) -> NoReturn:
    raise LedgerVerificationError(f"the ledger does not verify at its signed tree heads: {why}")


def ledger_verifier(
    folder: Path, public_key: Path | bytes | None = None, pinned_fingerprint: str | None = None
) -> tuple[Verifier, bool]:
    """The key to check `folder` with and whether it is pinned. A key the caller passed that
    cannot be read is LedgerError (their input); a key beside the ledger that cannot be read,
    or any key whose fingerprint differs from the pinned one, is LedgerVerificationError."""
    expected = None if pinned_fingerprint is None else parse_fingerprint(pinned_fingerprint)
    if public_key is not None:
        try:
            pem = public_key if isinstance(public_key, bytes) else Path(public_key).read_bytes()
        except OSError as err:
            raise LedgerError(f"cannot read the public key: {err}") from err
        verifier = Verifier.from_pem(pem)
    else:
        try:
            verifier = Verifier.from_pem((folder / PUBLIC_KEY_FILE).read_bytes())
        except (OSError, LedgerError) as err:
            at_heads(f"no usable public key beside the ledger ({PUBLIC_KEY_FILE}: {err}); pass --public-key")
    if expected is not None and verifier.key_id != expected:
        at_heads(f"the key's fingerprint is {verifier.key_id}, not the pinned {expected}: not the hospital's key")
    return verifier, public_key is not None or expected is not None


def verify_ledger(
    folder: Path,
    public_key: Path | bytes | None = None,
    trusted_head: SignedTreeHead | None = None,
    *,
    pinned_fingerprint: str | None = None,
) -> VerifyResult:
    """Raise LedgerVerificationError naming the first broken entry (or the heads); else summarise.

    `trusted_head`: a head obtained earlier (a report embeds one); the ledger must still
    contain that exact tree, which detects a truncation that also removed later heads."""
    folder = Path(folder)
    if not (folder / DB_FILE).is_file():
        raise LedgerError(f"{folder} holds no ledger ({DB_FILE} is missing)")
    verifier, pinned = ledger_verifier(folder, public_key, pinned_fingerprint)
    try:
        snapshot = read_snapshot(folder / DB_FILE)
    except LedgerError as err:
        at_heads(str(err))
    return _Check(folder, snapshot, verifier).run(trusted_head, pinned)


class _Check:
    def __init__(self, folder: Path, snapshot: Snapshot, verifier: Verifier) -> None:
        self.folder = folder
        self.snapshot = snapshot
        self.verifier = verifier
        self.blobs_checked: set[str] = set()

    def run(self, trusted: SignedTreeHead | None, pinned: bool) -> VerifyResult:
        heads = self.heads()
        entries = self.entries()
        n = len(entries)
        wanted = {h.head.size for h in heads} | ({trusted.head.size} if trusted else set())
        roots, compact = self.roots(entries, wanted)
        self.check_heads(heads, entries, roots)
        latest = heads[-1]
        if latest.head.size != n:
            at_entry(latest.head.size, f"entries after {latest.head.size} are not covered by a signed head")
        state_hash = self.check_tip(latest, compact)
        if trusted is not None:
            if not trusted.verify(self.verifier):
                at_heads("the trusted tree head given does not verify under this key")
            size = trusted.head.size
            if size > n:
                at_entry(n, f"the ledger no longer contains the trusted tree of size {size}: it holds {n} (truncated)")
            if roots[size] != trusted.head.root:
                at_heads(
                    f"the ledger no longer contains the trusted tree of size {size}: its first {size} entries differ "
                    "(cut back and re-extended, or rewritten)"
                )
        return VerifyResult(n, len(heads), roots[n].hex(), self.verifier.key_id, pinned, latest, state_hash)

    def heads(self) -> list[SignedTreeHead]:
        if not self.snapshot.heads:
            at_heads("the ledger has no signed tree head")
        heads = []
        for index, row in enumerate(self.snapshot.heads):
            try:
                heads.append(parse_head_row(row, what=f"tree head #{index}"))
            except (FormatError, TypeError) as err:
                at_heads(str(err))
        return heads

    def entries(self) -> list[Entry]:
        entries: list[Entry] = []
        previous_time = ""
        for index, row in enumerate(self.snapshot.entries):
            seq, raw = row
            if seq != index:
                at_entry(index, f"entry {index} is missing (the next stored entry is {seq!r:.20})")
            try:
                entry = parse_entry(raw, index)
            except FormatError as err:
                at_entry(index, str(err))
            if entry.time < previous_time:
                at_entry(index, f"entry {index} is dated {entry.time}, before entry {index - 1} ({previous_time})")
            previous_time = entry.time
            for name, payload in sorted(entry.payloads.items()):
                self.check_blob(index, name, payload.sha256, payload.size)
            entries.append(entry)
        return entries

    def check_blob(self, seq: int, name: str, digest: str, size: int) -> None:
        if digest in self.blobs_checked:
            return
        what = f"entry {seq}'s payload {name!r:.40} (blob {digest})"
        path = self.folder / BLOB_DIR / digest[:2] / digest  # digest checked: 64 lowercase hex
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                at_entry(seq, f"{what} is not a regular file")
            if info.st_size != size:
                at_entry(seq, f"{what} has {info.st_size} bytes, the entry says {size}")
            h = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    h.update(block)
        except FileNotFoundError:
            at_entry(seq, f"{what} is missing")
        except OSError as err:
            at_entry(seq, f"{what} cannot be read: {err}")
        if h.hexdigest() != digest:
            at_entry(seq, f"{what} does not match its hash (altered or swapped)")
        self.blobs_checked.add(digest)

    @staticmethod
    def roots(entries: list[Entry], wanted: Iterable[int]) -> tuple[dict[int, bytes], CompactRange]:
        """The root of the first k entries for each wanted k (and for all of them)."""
        wanted = set(wanted)
        compact = CompactRange.empty()
        roots = {0: EMPTY_ROOT}
        for entry in entries:
            compact = compact.append(merkle.leaf_hash(entry.raw))
            if compact.size in wanted:
                roots[compact.size] = compact.root()
        roots[compact.size] = compact.root()
        return roots, compact

    def check_heads(self, heads: list[SignedTreeHead], entries: list[Entry], roots: dict[int, bytes]) -> None:
        n = len(entries)
        previous: SignedTreeHead | None = None
        for index, head in enumerate(heads):
            size = head.head.size
            if not head.verify(self.verifier):
                at_heads(f"tree head #{index} (size {size}) has a bad signature or another key's id")
            if previous is not None and (size <= previous.head.size or head.head.time < previous.head.time):
                at_heads(f"tree head #{index} (size {size}, {head.head.time}) is out of order (replayed)")
            if size > n:
                at_entry(n, f"a signed tree head covers {size} entries but only {n} are stored (truncated)")
            if roots[size] != head.head.root:
                at_entry(
                    _first_divergence(heads, roots, n), f"the entries do not match the signed tree head of size {size}"
                )
            if size and entries[size - 1].time > head.head.time:
                at_entry(size - 1, f"entry {size - 1} is dated after the head that signs it")
            previous = head

    def check_tip(self, latest: SignedTreeHead, compact: CompactRange) -> str:
        """The stored compact range and state: what the next append and `Ledger.state()` trust."""
        tips = self.snapshot.tips
        if len(tips) != 1:
            at_heads(f"the ledger holds {len(tips)} tip rows, not 1")
        row_id, size, compact_bytes, state = tips[0]
        if row_id != 0 or type(size) is not int or size != compact.size or compact_bytes != compact.to_bytes():
            at_heads("the stored compact range does not match the entries (the next append would refuse)")
        if not isinstance(state, bytes) or sha256_hex(state) != latest.head.state_sha256:
            at_heads("the stored state is not the state the latest signed head commits to (edited or reset)")
        try:
            parse_state(state)
        except FormatError as err:
            at_heads(str(err))
        return latest.head.state_sha256


def _first_divergence(heads: list[SignedTreeHead], roots: dict[int, bytes], n: int) -> int:
    """The first broken entry: a head of size k commits to entries 0..k-1, so the smallest
    head that no longer matches names entry k-1 (heads exist at every size)."""
    for head in sorted(heads, key=lambda h: h.head.size):
        size = head.head.size
        if size in roots and roots[size] != head.head.root:
            return max(size - 1, 0)
    return n


def describe(result: VerifyResult) -> dict[str, Any]:
    """The result as JSON (for `fedgate ledger verify --json` and reports)."""
    return {
        "entries": result.entries,
        "tree_heads": result.tree_heads,
        "root": result.root,
        "key_id": result.key_id,
        "pinned": result.pinned,
        "latest_head": result.latest_head.to_json(),
        "state_sha256": result.state_sha256,
    }
