"""Inclusion and consistency proofs as self-contained JSON that a third party checks with the
hospital's key, pinned (`fedgate ledger prove | check-proof | consistency`).

A proof carries the hospital's public key for convenience, but checking never trusts it on
its own: the reader passes the key they hold, or its fingerprint (and then the carried key
is used only if its fingerprint is that one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger import merkle
from fedgate.ledger.compact import EMPTY_ROOT
from fedgate.ledger.formats import FormatError, SignedTreeHead, check_count, check_digest, parse_entry, parse_head_row
from fedgate.ledger.signing import PUBLIC_KEY_FILE, Verifier, parse_fingerprint
from fedgate.ledger.store import DB_FILE, read_snapshot

PROOF_FORMAT = "fedgate-inclusion-proof/1"
CONSISTENCY_FORMAT = "fedgate-consistency-proof/1"
PROOF_FIELDS = frozenset({"format", "seq", "entry", "tree_size", "proof", "tree_head", "public_key"})
CONSISTENCY_FIELDS = frozenset({"format", "old_head", "new_head", "proof"})


def _malformed(why: str) -> NoReturn:
    raise LedgerVerificationError(f"malformed proof: {why}")


def _stored_tree(folder: Path) -> tuple[list[bytes], list[bytes], SignedTreeHead]:
    """Entries, their leaf hashes and the latest head, from one consistent read of the database."""
    snapshot = read_snapshot(Path(folder) / DB_FILE)
    try:
        entries = [parse_entry(row[1], index).raw for index, row in enumerate(snapshot.entries)]
        leaves = [merkle.leaf_hash(entry) for entry in entries]
        if not snapshot.heads:
            raise FormatError("the ledger has no signed tree head")
        head = parse_head_row(snapshot.heads[-1], what="the latest tree head")
    except FormatError as err:
        raise LedgerError(f"{err}; run `fedgate ledger verify {folder}`") from err
    if head.head.size != len(leaves):
        raise LedgerError(
            f"the latest signed tree head does not cover the ledger; run `fedgate ledger verify {folder}`"
        )
    return entries, leaves, head


def _public_key_text(folder: Path) -> str:
    try:
        return (Path(folder) / PUBLIC_KEY_FILE).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"cannot read the ledger's public key: {err}") from err


def make_proof(folder: Path, seq: int) -> dict[str, Any]:
    entries, leaves, head = _stored_tree(folder)
    if not 0 <= seq < len(leaves):
        raise LedgerError(f"the ledger has no entry {seq} (it has {len(leaves)})")
    return {
        "format": PROOF_FORMAT,
        "seq": seq,
        "entry": entries[seq].decode("utf-8"),
        "tree_size": len(leaves),
        "proof": [p.hex() for p in merkle.inclusion_proof(seq, leaves)],
        "tree_head": head.to_json(),
        "public_key": _public_key_text(folder),
    }


def proof_verifier(carried_pem: object, public_key_pem: bytes | None, pinned_fingerprint: str | None) -> Verifier:
    """The pinned key: the reader's own, or the carried one if it has the pinned fingerprint.
    Neither given is LedgerError: a proof is never checked with only the key it carries."""
    if public_key_pem is None and pinned_fingerprint is None:
        raise LedgerError(
            "checking a proof needs the hospital's key: pass --public-key FILE or --fingerprint HEX "
            "(the key inside the proof is never trusted on its own)"
        )
    expected = None if pinned_fingerprint is None else parse_fingerprint(pinned_fingerprint)
    if public_key_pem is not None:
        verifier = Verifier.from_pem(public_key_pem)
    else:
        if not isinstance(carried_pem, str):
            _malformed("it carries no public key, and only a fingerprint was given")
        try:
            verifier = Verifier.from_pem(carried_pem.encode("ascii", "replace"))
        except LedgerError as err:
            _malformed(f"its public key: {err}")
    if expected is not None and verifier.key_id != expected:
        raise LedgerVerificationError(
            f"the key's fingerprint is {verifier.key_id}, not the pinned {expected}: not the hospital's key"
        )
    return verifier


def check_proof(
    proof: object, public_key_pem: bytes | None = None, *, pinned_fingerprint: str | None = None
) -> dict[str, Any]:
    """Raise LedgerVerificationError unless the entry is in the tree the hospital signed.
    The key is pinned by `public_key_pem` and/or `pinned_fingerprint` (one is required)."""
    if not isinstance(proof, dict):
        _malformed("not a JSON object")
    if proof.get("format") != PROOF_FORMAT:
        _malformed(f"not a {PROOF_FORMAT} document")
    if set(proof) != PROOF_FIELDS:
        _malformed(f"it must have exactly the fields {sorted(PROOF_FIELDS)}")
    verifier = proof_verifier(proof["public_key"], public_key_pem, pinned_fingerprint)
    try:
        head = SignedTreeHead.from_json(proof["tree_head"])
        seq = check_count(proof["seq"], "seq")
        size = check_count(proof["tree_size"], "tree_size")
        if not isinstance(proof["entry"], str) or not isinstance(proof["proof"], list):
            raise FormatError("entry is a string and proof a list of hashes")
        path = [bytes.fromhex(check_digest(p, "proof hash")) for p in proof["proof"]]
        entry = parse_entry(proof["entry"].encode("utf-8"), seq)
    except (FormatError, UnicodeEncodeError) as err:
        _malformed(str(err))
    if not head.verify(verifier):
        raise LedgerVerificationError("the tree head's signature does not verify under this key")
    if head.head.size != size:
        raise LedgerVerificationError(f"the proof is for a tree of {size}, the head signs {head.head.size}")
    if not merkle.verify_inclusion(merkle.leaf_hash(entry.raw), seq, size, path, head.head.root):
        raise LedgerVerificationError(f"entry {seq} is not included in the signed tree of size {size}", seq)
    return {"seq": seq, "tree_size": size, "root": head.head.root.hex(), "key_id": verifier.key_id}


def make_consistency_proof(folder: Path, old: SignedTreeHead) -> dict[str, Any]:
    """A proof that the ledger's latest signed head extends `old` (RFC 9162 2.1.4)."""
    _, leaves, new = _stored_tree(folder)
    if old.head.size > len(leaves):
        raise LedgerVerificationError(
            f"the ledger holds {len(leaves)} entries, fewer than the {old.head.size} of the old head (truncated)",
            len(leaves),
        )
    return {
        "format": CONSISTENCY_FORMAT,
        "old_head": old.to_json(),
        "new_head": new.to_json(),
        "proof": [p.hex() for p in merkle.consistency_proof(old.head.size, leaves)],
    }


def check_consistency(document: object, verifier: Verifier) -> dict[str, Any]:
    """Raise LedgerVerificationError unless both heads are the hospital's and the new tree
    is the old tree with entries appended (nothing rewritten, nothing removed)."""
    if not isinstance(document, dict) or document.get("format") != CONSISTENCY_FORMAT:
        _malformed(f"not a {CONSISTENCY_FORMAT} document")
    if set(document) != CONSISTENCY_FIELDS:
        _malformed(f"it must have exactly the fields {sorted(CONSISTENCY_FIELDS)}")
    try:
        old = SignedTreeHead.from_json(document["old_head"])
        new = SignedTreeHead.from_json(document["new_head"])
        if not isinstance(document["proof"], list):
            raise FormatError("proof is a list of hashes")
        path = [bytes.fromhex(check_digest(p, "proof hash")) for p in document["proof"]]
    except FormatError as err:
        _malformed(str(err))
    for name, head in (("old", old), ("new", new)):
        if not head.verify(verifier):
            raise LedgerVerificationError(f"the {name} tree head's signature does not verify under this key")
    if new.head.size < old.head.size:
        raise LedgerVerificationError(f"the new head signs {new.head.size} entries, fewer than the old {old.head.size}")
    if new.head.time < old.head.time:
        raise LedgerVerificationError("the new head is dated before the old one")
    if old.head.size == 0 and old.head.root != EMPTY_ROOT:
        raise LedgerVerificationError("the old head claims an empty tree with a root that is not the empty root")
    if not merkle.verify_consistency(old.head.size, new.head.size, path, old.head.root, new.head.root):
        raise LedgerVerificationError(
            f"the signed tree of {new.head.size} entries does not extend the old tree of {old.head.size} "
            "(rewritten or forked history)"
        )
    return {
        "old_size": old.head.size,
        "new_size": new.head.size,
        "old_root": old.head.root.hex(),
        "new_root": new.head.root.hex(),
        "key_id": verifier.key_id,
    }
