"""Crafted FABs: the reference app's files, edited, re-zipped the way `flwr build` zips them, with
`.info/CONTENT` recomputed so that each one passes Flower's own checks (unless the test is about
CONTENT). Byte-level patches make what zipfile will not write: lying sizes, NUL in names, gaps."""

from __future__ import annotations

import hashlib
import io
import stat
import struct
import tomllib
import zipfile
import zlib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import tomli_w
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_DATE

REPO = Path(__file__).resolve().parents[2]
MEDICAL = REPO / "apps" / "medical"
CONTENT = ".info/CONTENT"
CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header, 46 bytes


@cache
def reference_fab() -> bytes:
    """The reference app's FAB, built by Flower's own `flwr build` code (offline, deterministic)."""
    return build_fab_from_disk(MEDICAL)


def reference_files() -> dict[str, bytes]:
    """The reference FAB's members (CONTENT excluded), in archive order."""
    with zipfile.ZipFile(io.BytesIO(reference_fab())) as archive:
        return {name: archive.read(name) for name in archive.namelist() if name != CONTENT}


def content_for(files: Mapping[str, bytes]) -> str:
    """CONTENT as flwr build writes it: `path,sha256,size_in_bits`, newline-joined."""
    return "\n".join(f"{path},{hashlib.sha256(data).hexdigest()},{len(data) * 8}" for path, data in files.items())


def make_fab(
    files: Mapping[str, bytes],
    content: str | None = None,
    attrs: Mapping[str, int] | None = None,
    compress: int = zipfile.ZIP_STORED,
    extra: Mapping[str, bytes] | None = None,
) -> bytes:
    """A FAB of `files` plus CONTENT (recomputed unless given), written like flwr build writes it.
    `attrs` sets a member's external attributes (symlinks, devices); `extra` adds members that
    CONTENT does not list."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as archive:
        for name, data in {**files, **(extra or {})}.items():
            info = zipfile.ZipInfo(name, date_time=FAB_DATE)
            info.compress_type = compress
            if attrs and name in attrs:
                info.external_attr = attrs[name]
            archive.writestr(info, data)
        info = zipfile.ZipInfo(CONTENT, date_time=FAB_DATE)
        info.compress_type = compress
        archive.writestr(info, content if content is not None else content_for(files))
    return buffer.getvalue()


def with_pyproject(files: Mapping[str, bytes], edit: Mapping[str, Any]) -> dict[str, bytes]:
    """`files` with pyproject.toml edited: `edit` maps dotted paths ("project.version") to values."""
    config = tomllib.loads(files["pyproject.toml"].decode())
    for dotted, value in edit.items():
        *parents, key = dotted.split(".")
        table = config
        for parent in parents:
            table = table.setdefault(parent, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return {**files, "pyproject.toml": tomli_w.dumps(config).encode()}


def reference_with(edit: Mapping[str, Any]) -> bytes:
    return make_fab(with_pyproject(reference_files(), edit))


def unix_attr(file_type: int, mode: int = 0o644) -> int:
    return (file_type | mode) << 16


SYMLINK = unix_attr(stat.S_IFLNK, 0o777)


def _central_entries(fab: bytes) -> list[tuple[int, tuple[Any, ...], str]]:
    """(offset, fields, name) of each central directory entry."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        position = archive.start_dir
        count = len(archive.infolist())
    entries = []
    for _ in range(count):
        fields = CENTRAL.unpack_from(fab, position)
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        name = fab[position + CENTRAL.size : position + CENTRAL.size + name_len].decode("cp437")
        entries.append((position, fields, name))
        position += CENTRAL.size + name_len + extra_len + comment_len
    return entries


def patch_member(fab: bytes, member: str, **changes: int | bytes) -> bytes:
    """Rewrite a member's header fields in both its local header and the central directory:
    `file_size`, `crc`, `header_offset` (central only), `name` (same length)."""
    out = bytearray(fab)
    for position, fields, entry_name in _central_entries(fab):
        if entry_name != member:
            continue
        local = fields[-1]  # relative offset of the local header
        if "file_size" in changes:
            struct.pack_into("<L", out, position + 24, changes["file_size"])
            struct.pack_into("<L", out, local + 22, changes["file_size"])
        if "crc" in changes:
            struct.pack_into("<L", out, position + 16, changes["crc"])
            struct.pack_into("<L", out, local + 14, changes["crc"])
        if "name" in changes:
            new = changes["name"]
            assert isinstance(new, bytes) and len(new) == len(member)
            out[position + CENTRAL.size : position + CENTRAL.size + len(new)] = new
            out[local + 30 : local + 30 + len(new)] = new
        if "header_offset" in changes:
            struct.pack_into("<L", out, position + 42, changes["header_offset"])
        return bytes(out)
    raise KeyError(member)


def lying_bomb(declared: int = 1000, inflated: int = 50 * 1024 * 1024) -> bytes:
    """A FAB whose `fedgate_medical/weights.json` inflates to `inflated` zero bytes while both its
    headers declare `declared` bytes, with the CRC and CONTENT of the first `declared` bytes:
    a reader that trusts the headers (Python's zipfile included) sees a small, valid file."""
    files = reference_files()
    name = "fedgate_medical/weights.json"
    honest_prefix = b"\0" * declared
    files[name] = b"\0" * inflated
    content = content_for({**files, name: honest_prefix})
    fab = make_fab(files, content=content, compress=zipfile.ZIP_DEFLATED)
    return patch_member(fab, name, file_size=declared, crc=zlib.crc32(honest_prefix))
