"""Rules for a FAB's member names and entry types, applied to the zip's central directory.

A member is accepted only as a plain relative POSIX path of safe ASCII characters naming a
regular file of a kind `flwr build` packs. Everything else (traversal, absolute paths,
backslashes, links, devices, directories, compiled code) is refused by name, before any byte of
the member is decompressed, so the installer never meets a path it would have to interpret."""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from zipfile import ZipInfo

from fedgate.fab.flower_rules import MAX_DIR_DEPTH
from fedgate.fab.report import FabRefused

CONTENT_PATH = ".info/CONTENT"
PYPROJECT_PATH = "pyproject.toml"
MAX_PATH_CHARS = 1024
# A path segment: ASCII letters, digits and `_ . + -`; "." and ".." are refused separately.
SEGMENT = re.compile(r"[A-Za-z0-9_.+-]{1,255}", re.ASCII)
# The file kinds of flwr.common.constant.FAB_INCLUDE_PATTERNS ("**/*.py", ..., "/LICENSE");
# tests/fab/test_fab_check.py pins this list to Flower's so an upgrade that changes it fails loudly.
ALLOWED_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")
ROOT_ONLY_FILES = ("LICENSE",)
UNIX, MSDOS = 3, 0  # ZipInfo.create_system values
MSDOS_DIRECTORY, MSDOS_VOLUME = 0x10, 0x08


def check_path(name: str) -> None:
    """Refuse a member name that is not a plain relative path of safe segments (rule member-path)."""
    printable = repr(name[:200])
    if not name:
        raise FabRefused("member-path", "a member has an empty name", member=printable)
    if not name.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise FabRefused(
            "member-path", "member name has a non-ASCII or control character (NUL, newline...)", member=printable
        )
    if "\\" in name:
        raise FabRefused("member-path", "member name has a backslash", member=printable)
    if name.startswith("/"):
        raise FabRefused("member-path", "member name is an absolute path", member=printable)
    if len(name) > MAX_PATH_CHARS:
        raise FabRefused("member-path", f"member name is longer than {MAX_PATH_CHARS} characters", member=printable)
    if name.endswith("/"):
        raise FabRefused("member-type", "member is a directory entry (flwr build writes none)", member=printable)
    segments = name.split("/")
    if len(segments) > MAX_DIR_DEPTH:
        raise FabRefused("member-path", f"member is nested deeper than {MAX_DIR_DEPTH} levels", member=printable)
    for segment in segments:
        if segment == "":
            raise FabRefused("member-path", "member name has an empty segment (//)", member=printable)
        if segment in (".", ".."):
            raise FabRefused("member-path", f"member name has a {segment!r} segment", member=printable)
        if not SEGMENT.fullmatch(segment):
            raise FabRefused("member-path", "member name has a character outside A-Z a-z 0-9 _ . + -", member=printable)


def check_kind(name: str) -> None:
    """Refuse a member of a kind `flwr build` never packs (rule member-kind): compiled or native
    code would run in place of the source the hospital reviewed."""
    segments = name.split("/")
    if name in (CONTENT_PATH, PYPROJECT_PATH) or name in ROOT_ONLY_FILES:
        return
    if segments[0] == ".info":
        raise FabRefused("member-kind", "the .info folder holds only CONTENT", member=name)
    if "__pycache__" in segments:
        raise FabRefused("member-kind", "member is under __pycache__ (compiled code)", member=name)
    if not name.endswith(ALLOWED_SUFFIXES):
        raise FabRefused(
            "member-kind",
            f"member is not one of the kinds flwr build packs ({', '.join(ALLOWED_SUFFIXES)}, LICENSE)",
            member=name,
        )


def check_type(info: ZipInfo) -> None:
    """Refuse anything but a regular file, read from the zip's external attributes (rule member-type)."""
    if info.create_system not in (UNIX, MSDOS):
        raise FabRefused(
            "member-type",
            f"member was made on host system {info.create_system}; FABs are made on Unix (3) or MS-DOS (0)",
            member=info.filename,
        )
    if info.external_attr & (MSDOS_DIRECTORY | MSDOS_VOLUME):
        raise FabRefused("member-type", "member is marked as a directory or volume label", member=info.filename)
    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)
    if info.create_system == UNIX and file_type not in (0, stat.S_IFREG):
        kind = {
            stat.S_IFLNK: "a symlink",
            stat.S_IFDIR: "a directory",
            stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device",
            stat.S_IFIFO: "a FIFO",
            stat.S_IFSOCK: "a socket",
        }.get(file_type, f"file type {file_type:#o}")
        raise FabRefused("member-type", f"member is {kind}, not a regular file", member=info.filename)


def check_unique(names: Sequence[str]) -> None:
    """Refuse duplicates, duplicates up to case (they collide on case-insensitive file systems and
    in review), and a path that is both a file and a folder (rule member-duplicate)."""
    seen: dict[str, str] = {}
    for name in names:
        folded = name.casefold()
        if folded in seen:
            raise FabRefused(
                "member-duplicate", "two members have the same path (up to case)", member=name, other=seen[folded]
            )
        seen[folded] = name
    for name in names:
        parts = name.casefold().split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in seen:
                raise FabRefused(
                    "member-duplicate", "a path is both a file and a folder", member=name, other=seen[folder]
                )
