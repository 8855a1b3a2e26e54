"""Inclusion proofs as self-contained JSON that a third party checks with only the
hospital's public key (`fedgate ledger prove` / `fedgate ledger check-proof`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger import merkle
from fedgate.ledger.signing import PUBLIC_KEY_FILE, Verifier
from fedgate.ledger.store import Ledger, SignedTreeHead

PROOF_FORMAT = "fedgate-inclusion-proof/1"


def make_proof(folder: Path, seq: int) -> dict[str, Any]:
    with Ledger(folder, create=False) as ledger:
        raw = dict(ledger.raw_entries())
        if seq not in raw:
            raise LedgerError(f"the ledger has no entry {seq} (it has {len(raw)})")
        leaves = [merkle.leaf_hash(raw[i]) for i in range(len(raw))]
        head = ledger.latest_head()
        if head is None or head.head.size != len(leaves):
            raise LedgerError("the latest signed tree head does not cover the ledger; run `fedgate ledger verify`")
        return {
            "format": PROOF_FORMAT,
            "seq": seq,
            "entry": raw[seq].decode("utf-8"),
            "tree_size": len(leaves),
            "proof": [p.hex() for p in merkle.inclusion_proof(seq, leaves)],
            "tree_head": head.to_json(),
            "public_key": (folder / PUBLIC_KEY_FILE).read_text(),
        }


def check_proof(proof: dict[str, Any], public_key_pem: bytes | None = None) -> dict[str, Any]:
    """Raise LedgerVerificationError unless the entry is in the signed tree. Pass the
    hospital's key to pin it; otherwise the key in the proof is used and its id returned,
    for the reader to compare with the key the hospital published."""
    try:
        if proof.get("format") != PROOF_FORMAT:
            raise LedgerVerificationError(f"not a {PROOF_FORMAT} document")
        verifier = Verifier.from_pem(public_key_pem or proof["public_key"].encode("ascii"))
        head = SignedTreeHead.from_json(proof["tree_head"])
        entry = proof["entry"].encode("utf-8")
        path = [bytes.fromhex(p) for p in proof["proof"]]
        seq, size = int(proof["seq"]), int(proof["tree_size"])
    except (KeyError, ValueError, TypeError) as err:
        raise LedgerVerificationError(f"malformed proof: {err}") from err
    if not head.verify(verifier):
        raise LedgerVerificationError("the tree head's signature does not verify under this key")
    if head.head.size != size:
        raise LedgerVerificationError(f"the proof is for a tree of {size}, the head signs {head.head.size}")
    if json.loads(entry).get("seq") != seq:
        raise LedgerVerificationError("the entry's own sequence number differs from the proof's")
    if not merkle.verify_inclusion(merkle.leaf_hash(entry), seq, size, path, head.head.root):
        raise LedgerVerificationError(f"entry {seq} is not included in the signed tree of size {size}", seq)
    return {"seq": seq, "tree_size": size, "root": head.head.root.hex(), "key_id": verifier.key_id}
