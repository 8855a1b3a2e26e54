"""Install a checked FAB under the hospital's folder, named by its SHA-256 and nothing else.

`<fab_root>/<sha256>/` is written by our own code from the bytes the check verified (never
zipfile.extractall, never Flower's installer, which joins the FAB's own version string into its
path): into a fresh temporary folder inside fab_root, every file opened relative to its folder's
descriptor with O_CREAT|O_EXCL|O_NOFOLLOW, made read-only (files 0444, folders 0555), then renamed
into place in one step. A folder that already exists is verified against the FAB, file by file,
and refused if it differs: the hash in its name is a claim until its contents are checked."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedgate.errors import FedgateError
from fedgate.fab.archive import Member
from fedgate.fab.check import refuse_unapproved, verify_fab
from fedgate.fab.policy import FabPolicy
from fedgate.fab.report import FabRefused, FabReport

FILE_MODE, DIR_MODE = 0o444, 0o555
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_PREFIX = ".tmp-"


class FabInstallError(FedgateError):
    """The FAB passed the check but could not be written under the FAB folder (disk full, permissions,
    a missing hospital folder). Nothing of it runs; fix the folder and the next task retries."""


@dataclass(frozen=True)
class InstalledFab:
    path: Path  # <fab_root>/<sha256>: bind it read-only into the sandbox, import the app from it
    sha256: str
    client_app_ref: str
    server_app_ref: str
    report: FabReport


def install_fab(fab_bytes: bytes, fab_root: Path, policy: FabPolicy) -> InstalledFab:
    """Approve, check, then install (or re-verify) the FAB at `<fab_root>/<sha256>/`.

    Raises FabRefused (with `.report`) before anything is written when the FAB is not approved
    or fails the check, or when an existing copy differs; FabInstallError on I/O failure."""
    refuse_unapproved(fab_bytes, policy)  # before the archive is even parsed
    verified = verify_fab(fab_bytes, policy)
    report = verified.report
    assert report.client_app is not None and report.server_app is not None  # accepted reports have both
    try:
        fab_root.mkdir(mode=0o700, exist_ok=True)
        root_fd = os.open(fab_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise FabInstallError(f"cannot open the FAB folder {fab_root}: {err}") from err
    try:
        if _exists(root_fd, report.sha256) or not _write_new(root_fd, report.sha256, verified.contents):
            _verify_installed(root_fd, report, verified.contents)
    except OSError as err:
        raise FabInstallError(f"cannot install FAB {report.fab_ref} under {fab_root}: {err}") from err
    finally:
        os.close(root_fd)
    return InstalledFab(fab_root / report.sha256, report.sha256, report.client_app, report.server_app, report)


def _exists(root_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _segments(path: str) -> list[str]:
    """The path's segments; the check already refused anything else, this is the writer's own guard."""
    segments = path.split("/")
    if any(s in ("", ".", "..") or "\0" in s for s in segments):
        raise FabInstallError(f"refusing to write member {path!r}: not a plain relative path")
    return segments


def _write_new(root_fd: int, sha256: str, contents: Iterable[Member]) -> bool:
    """Write into a temporary folder and rename it to `sha256`. False if another installer got
    there first (the caller then verifies that copy)."""
    temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    os.mkdir(temp, 0o700, dir_fd=root_fd)
    try:
        temp_fd = os.open(temp, DIR_FLAGS, dir_fd=root_fd)
        try:
            folders: set[tuple[str, ...]] = set()
            for member in contents:
                *parents, leaf = _segments(member.name)
                parent_fd = _make_folders(temp_fd, parents, folders)
                try:
                    _write_file(parent_fd, leaf, member.data)
                finally:
                    if parent_fd != temp_fd:
                        os.close(parent_fd)
            for folder in sorted(folders, key=len, reverse=True):  # children before parents
                fd = _open_folder(temp_fd, folder)
                try:
                    os.fchmod(fd, DIR_MODE)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.fchmod(temp_fd, DIR_MODE)
            os.fsync(temp_fd)
        finally:
            os.close(temp_fd)
    except BaseException:
        _remove(root_fd, temp)
        raise
    try:
        os.rename(temp, sha256, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except OSError as err:
        _remove(root_fd, temp)
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    os.fsync(root_fd)
    return True


def _make_folders(temp_fd: int, parents: list[str], made: set[tuple[str, ...]]) -> int:
    """A descriptor for the folder `parents` under temp_fd, creating what is missing (0700 while writing)."""
    fd = temp_fd
    for depth, name in enumerate(parents, start=1):
        if tuple(parents[:depth]) not in made:
            os.mkdir(name, 0o700, dir_fd=fd)
            made.add(tuple(parents[:depth]))
        child = os.open(name, DIR_FLAGS, dir_fd=fd)
        if fd != temp_fd:
            os.close(fd)
        fd = child
    return fd


def _open_folder(temp_fd: int, folder: tuple[str, ...]) -> int:
    fd = temp_fd
    for name in folder:
        child = os.open(name, DIR_FLAGS, dir_fd=fd)
        if fd != temp_fd:
            os.close(fd)
        fd = child
    return fd


def _write_file(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(root_fd: int, name: str) -> None:
    """Remove a temporary folder of ours, read-only folders included (not following links)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        return
    try:
        _make_writable(fd)
    finally:
        os.close(fd)
    shutil.rmtree(name, dir_fd=root_fd)


def _make_writable(dir_fd: int) -> None:
    os.fchmod(dir_fd, 0o700)
    for entry in os.scandir(dir_fd):
        if entry.is_dir(follow_symlinks=False):
            child = os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                _make_writable(child)
            finally:
                os.close(child)


def _verify_installed(root_fd: int, report: FabReport, contents: Iterable[Member]) -> None:
    """Refuse (installed-copy-differs) unless `<sha256>/` holds exactly the FAB's files, read-only."""
    expected = {m.name: hashlib.sha256(m.data).hexdigest() for m in contents}
    expected_folders = {name.rsplit("/", 1)[0] for name in expected if "/" in name}
    expected_folders |= {f.rsplit("/", i)[0] for f in set(expected_folders) for i in range(1, f.count("/") + 1)}
    found: dict[str, str] = {}
    found_folders: set[str] = set()
    problems: list[str] = []
    try:
        top = os.open(report.sha256, DIR_FLAGS, dir_fd=root_fd)
    except OSError as err:
        problems.append(f"{report.sha256} is not a folder: {err.strerror}")
    else:
        try:
            _walk(top, "", found, found_folders, problems)
        finally:
            os.close(top)
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            problems.append(
                f"{name}: {'missing' if name not in found else 'extra' if name not in expected else 'differs'}"
            )
    problems += [f"{folder}/: unexpected folder" for folder in sorted(found_folders - expected_folders)]
    if problems:
        refusal = FabRefused(
            "installed-copy-differs",
            f"the installed copy of {report.fab_ref} differs from the FAB; remove that folder to reinstall it",
            first=problems[0][:500],
            problems=len(problems),
        )
        detail = tuple(sorted(refusal.detail.items()))
        refusal.report = dataclasses.replace(
            report, verdict="refused", rule=refusal.rule, reason=refusal.reason, detail=detail
        )
        raise refusal


def _walk(dir_fd: int, prefix: str, found: dict[str, str], folders: set[str], problems: list[str]) -> None:
    if stat.S_IMODE(os.fstat(dir_fd).st_mode) != DIR_MODE:
        problems.append(f"{prefix or './'}: folder is not read-only ({DIR_MODE:o})")
    for entry in os.scandir(dir_fd):
        path = f"{prefix}{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            folders.add(path)
            child = os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
            try:
                _walk(child, f"{path}/", found, folders, problems)
            finally:
                os.close(child)
        elif entry.is_file(follow_symlinks=False):
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
                    problems.append(f"{path}: file is not read-only ({FILE_MODE:o})")
                digest = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
                found[path] = digest.hexdigest()
            finally:
                os.close(fd)
        else:
            problems.append(f"{path}: neither a file nor a folder (symlink?)")
