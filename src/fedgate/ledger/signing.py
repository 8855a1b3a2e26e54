"""The hospital's Ed25519 key for signed tree heads. Callers never touch raw key bytes:
they get a `Signer` (private, file mode 0600) or a `Verifier` (public, exportable)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedgate.errors import LedgerError

PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"


@dataclass(frozen=True)
class Verifier:
    key: Ed25519PublicKey

    @property
    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def key_id(self) -> str:
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def from_pem(cls, pem: bytes) -> Verifier:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError as err:
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


def load_or_create_signer(folder: Path) -> Signer:
    """The key in `folder`, created on first use with mode 0600 (and its public half beside it)."""
    private_path = folder / PRIVATE_KEY_FILE
    if private_path.exists():
        mode = private_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise LedgerError(f"{private_path} is readable by others (mode {mode:o}); run chmod 600 on it")
        key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"{private_path} is not an Ed25519 key")
        return Signer(key)
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    partial = private_path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, private_path)
    signer = Signer(key)
    (folder / PUBLIC_KEY_FILE).write_bytes(signer.verifier.pem)
    fsync_dir(folder)
    return signer


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
