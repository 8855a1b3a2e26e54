"""Check a ledger from its bytes alone: every entry, every blob, the tree and every signed
tree head. Nothing stored is trusted: leaf hashes and roots are recomputed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedgate.canonical import canonical_json
from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger import merkle
from fedgate.ledger.signing import PUBLIC_KEY_FILE, Verifier
from fedgate.ledger.store import Ledger, SignedTreeHead


@dataclass(frozen=True)
class VerifyResult:
    entries: int
    tree_heads: int
    root: str
    key_id: str


def load_verifier(folder: Path, public_key: Path | None = None) -> Verifier:
    path = public_key or folder / PUBLIC_KEY_FILE
    if not path.is_file():
        raise LedgerError(f"public key {path} is missing: pass the hospital's key with --public-key")
    return Verifier.from_pem(path.read_bytes())


def verify_ledger(
    folder: Path, public_key: Path | None = None, trusted_head: SignedTreeHead | None = None
) -> VerifyResult:
    """Raise LedgerVerificationError naming the first broken entry (or head); else summarise.

    `trusted_head`: a head obtained earlier (say, by an auditor); the ledger must still
    contain that exact tree, which detects a truncation that also removed later heads."""
    verifier = load_verifier(Path(folder), public_key)
    with Ledger(Path(folder), create=False) as ledger:
        leaves: list[bytes] = []
        for index, (seq, raw) in enumerate(ledger.raw_entries()):
            if seq != index:
                raise LedgerVerificationError(f"entry {index} is missing (next stored entry is {seq})", index)
            try:
                entry = json.loads(raw)
            except ValueError as err:
                raise LedgerVerificationError(f"entry {seq} is not JSON: {err}", seq) from err
            if not isinstance(entry, dict) or canonical_json(entry) != raw:
                raise LedgerVerificationError(f"entry {seq} is not in canonical form (altered?)", seq)
            if entry.get("seq") != seq:
                raise LedgerVerificationError(
                    f"entry {seq} claims sequence {entry.get('seq')} (moved or duplicated)", seq
                )
            for name, blob in sorted(entry.get("payloads", {}).items()):
                actual = ledger.blobs.digest_of(blob["sha256"])
                if actual is None:
                    raise LedgerVerificationError(
                        f"entry {seq}: payload {name!r} blob {blob['sha256']} is missing", seq
                    )
                if actual != blob["sha256"]:
                    raise LedgerVerificationError(
                        f"entry {seq}: payload {name!r} blob does not match its hash (altered or swapped)", seq
                    )
                if ledger.blobs.path(blob["sha256"]).stat().st_size != blob["size"]:
                    raise LedgerVerificationError(f"entry {seq}: payload {name!r} has the wrong size", seq)
            leaves.append(merkle.leaf_hash(raw))

        heads = ledger.tree_heads()
        roots = merkle.prefix_roots(leaves)
        if leaves and not heads:
            raise LedgerVerificationError("the ledger has entries but no signed tree head")
        previous_size, previous_time = 0, ""
        for head in heads:
            if not head.verify(verifier):
                raise LedgerVerificationError(
                    f"tree head of size {head.head.size} has a bad signature or another key's id"
                )
            size = head.head.size
            if size > len(leaves):
                raise LedgerVerificationError(
                    f"a signed tree head covers {size} entries but only {len(leaves)} are stored (truncated)",
                    len(leaves),
                )
            if size <= previous_size or head.head.time < previous_time:
                raise LedgerVerificationError(f"tree head of size {size} is out of order (replayed)", size - 1)
            if roots[size - 1] != head.head.root:
                raise LedgerVerificationError(
                    f"entries do not match the signed tree head of size {size}", _first_divergence(roots, heads)
                )
            previous_size, previous_time = size, head.head.time
        if heads and heads[-1].head.size != len(leaves):
            raise LedgerVerificationError(
                f"entries after {heads[-1].head.size} are not covered by a signed head", heads[-1].head.size
            )
        if trusted_head is not None:
            if not trusted_head.verify(verifier):
                raise LedgerVerificationError("the trusted tree head given does not verify under this key")
            size = trusted_head.head.size
            if size > len(leaves) or (size and roots[size - 1] != trusted_head.head.root):
                raise LedgerVerificationError(
                    f"the ledger no longer contains the trusted tree of size {size}", min(size, len(leaves))
                )
        return VerifyResult(len(leaves), len(heads), merkle.root(leaves).hex(), verifier.key_id)


def _first_divergence(roots: list[bytes], heads: list[SignedTreeHead]) -> int:
    """The first broken entry: a head of size k commits to entries 0..k-1, so the smallest
    head that no longer matches names entry k-1."""
    for head in heads:
        if roots[head.head.size - 1] != head.head.root:
            return head.head.size - 1
    return len(roots)
