"""The hospital's Ed25519 key for signed tree heads. Callers never touch raw key bytes:
they get a `Signer` (private, file mode 0600) or a `Verifier` (public, exportable).

A key is created only together with a brand-new ledger (`create_signer`); an existing ledger
whose key is missing is an error (`load_signer`), never silently given a new key, since a
new key would sign a history the old one never saw. Readers pin the key (`pinned_verifier`):
by the public key file a DPO holds, or by its fingerprint (SHA-256 of the raw 32-byte key)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedgate.errors import LedgerError

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNATURE_SIZE = 64


@dataclass(frozen=True)
class Verifier:
    key: Ed25519PublicKey

    @property
    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def key_id(self) -> str:
        """The key's fingerprint: SHA-256 of the raw public key, hex."""
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()

    @property
    def fingerprint(self) -> str:
        return self.key_id

    def verify(self, signature: bytes, data: bytes) -> bool:
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            self.key.verify(signature, data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    @classmethod
    def from_pem(cls, pem: bytes) -> Verifier:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            raise LedgerError(f"not a PEM public key: {err}") from err
        if not isinstance(key, Ed25519PublicKey):
            raise LedgerError("the ledger's public key must be Ed25519")
        return cls(key)


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.key.public_key())


def load_signer(folder: Path) -> Signer:
    """The key of an existing ledger. Missing, unreadable or shared with others: LedgerError."""
    private_path = folder / PRIVATE_KEY_FILE
    if not private_path.is_file():
        raise LedgerError(
            f"the signing key {private_path} is missing, so this ledger cannot be extended. Restore signing.key "
            f"from the hospital's backup (its fingerprint is in every signed tree head: `fedgate ledger head "
            f"{folder}`). Never create a new key for an existing ledger: to start over, use a new ledger folder."
        )
    mode = private_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise LedgerError(f"{private_path} is readable by others (mode {mode:o}); run chmod 600 on it")
    try:
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise LedgerError(f"{private_path} is not a readable private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{private_path} is not an Ed25519 key")
    signer = Signer(key)
    public = folder / PUBLIC_KEY_FILE
    if not public.is_file():  # derivable from the private key; rewrite it rather than fail
        _write_atomic(public, signer.verifier.pem, 0o644)
    return signer


def create_signer(folder: Path) -> Signer:
    """A new key for a brand-new ledger (mode 0600), its public half beside it. Never
    replaces a key: FileExistsError when one exists (or another process just made one)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomic(folder / PRIVATE_KEY_FILE, pem, 0o600, exclusive=True)
    signer = Signer(key)
    _write_atomic(folder / PUBLIC_KEY_FILE, signer.verifier.pem, 0o644)
    return signer


def _write_atomic(path: Path, data: bytes, mode: int, exclusive: bool = False) -> None:
    """Write a whole file or nothing. `exclusive`: link into place, failing if it exists."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(partial, path)
        else:
            os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    fsync_dir(path.parent)


def parse_fingerprint(text: str) -> str:
    """A key fingerprint as typed or pasted: 64 hex characters, colons and spaces ignored."""
    cleaned = re.sub(r"[\s:]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise LedgerError(f"{text!r:.80} is not a key fingerprint (64 hex characters, the SHA-256 of the key)")
    return cleaned


def pinned_verifier(
    beside: Path | None, public_key: Path | bytes | None = None, pinned_fingerprint: str | None = None
) -> tuple[Verifier, bool]:
    """The key to check a ledger (or proof) with, and whether it is pinned.

    Pinned: `public_key` (a PEM file or bytes the reader holds) and/or `pinned_fingerprint`,
    which the key used must match. Neither given: the public key file in `beside` is used
    unpinned (the caller must say so loudly). A key whose fingerprint differs is LedgerError."""
    if public_key is not None:
        pem = public_key if isinstance(public_key, bytes) else _read_key_file(public_key)
        verifier = Verifier.from_pem(pem)
    elif beside is not None:
        path = beside / PUBLIC_KEY_FILE
        if not path.is_file():
            raise LedgerError(f"there is no public key {path}: pass the hospital's key with --public-key")
        verifier = Verifier.from_pem(_read_key_file(path))
    else:
        raise LedgerError("no key to check with: pass the hospital's key (--public-key) or its --fingerprint")
    if pinned_fingerprint is not None:
        expected = parse_fingerprint(pinned_fingerprint)
        if verifier.key_id != expected:
            raise LedgerError(
                f"the public key's fingerprint is {verifier.key_id}, not the pinned {expected}: "
                "this is not the hospital's key"
            )
    return verifier, public_key is not None or pinned_fingerprint is not None


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise LedgerError(f"cannot read the public key {path}: {err}") from err


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
