"""What a sandbox is made of: the paths it may see, the limits it runs under, who it runs as.

A sandbox is built up from nothing (CONVENTIONS: bubblewrap's way): an empty root, then each
allowed path bound in. This module only *describes* that root; `bwrap.py` turns the
description into a command line and `worker.py` applies the layers that live inside."""

from __future__ import annotations

import importlib.util
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from fedgate.errors import FedgateError

SANDBOX_UID = 65534  # "nobody" inside the sandbox's user namespace, never 0
SANDBOX_GID = 65534
SCRATCH = "/tmp"  # the task's own tmpfs
SHM = "/dev/shm"  # a private, size-limited tmpfs (bubblewrap's /dev has none of its own)
CACHE = "/cache"  # the per-(app, run) cache: a size-limited tmpfs, when the policy allows one
CACHE_SEED = "/cache-seed"  # read-only: what an earlier task of the same (app, run) left in its cache
SYSTEM_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache")
CPU_TOPOLOGY = "/sys/devices/system/cpu"  # read by torch/OpenMP to size thread pools


class SandboxError(FedgateError):
    """The sandbox cannot be set up on this host; the message says what to install or change."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for the whole task (the process tree, not one process).

    Enforced three ways, strongest first: a delegated cgroup v2 subtree when the node has
    one (memory.max, pids.max, cpu.max); otherwise RLIMIT_NPROC inside the sandbox's user
    namespace (counts only the sandbox's processes), RLIMIT_AS/CPU/FSIZE per process and the
    runner's tree monitor (sums memory and CPU time over every process of the sandbox and
    kills it past the limit); and always the tmpfs sizes and a wall-clock timeout."""

    memory_mb: int = 16384
    processes: int = 256
    cpu_seconds: int = 3600
    scratch_mb: int = 1024
    shm_mb: int = 256
    cache_mb: int = 1024
    file_size_mb: int = 4096
    open_files: int = 1024
    timeout_s: float = 3600.0

    def to_json(self) -> dict[str, object]:
        return {
            "memory_mb": self.memory_mb,
            "processes": self.processes,
            "cpu_seconds": self.cpu_seconds,
            "scratch_mb": self.scratch_mb,
            "shm_mb": self.shm_mb,
            "cache_mb": self.cache_mb,
            "file_size_mb": self.file_size_mb,
            "open_files": self.open_files,
            "timeout_s": str(self.timeout_s),
        }


@dataclass(frozen=True)
class SandboxSpec:
    """Everything one sandbox is allowed: read-only paths (the Python installation, fedgate,
    the app, the data folder), an optional writable cache, the limits and the switches.

    `landlock=False` runs without the Landlock layer even where the kernel has it: it shows a
    hospital what holds on kernels without Landlock (Debian 12, Ubuntu 22.04: ABI <= 3)."""

    read_only: tuple[Path, ...]
    data_dir: Path | None = None
    cache: bool = True  # a size-limited tmpfs at /cache (limits.cache_mb)
    cache_seed: Path | None = None  # a host folder copied into /cache at start and written back after each task
    masks: tuple[Path, ...] = ()  # host folders hidden behind an empty tmpfs even if under a bound path
    limits: Limits = field(default_factory=Limits)
    landlock: bool = True
    max_frame: int = 1 << 30
    host_uid: int = SANDBOX_UID  # as root: the unprivileged host uid the sandbox runs as
    writable: tuple[Path, ...] = ()  # host folders bound read-write at their own path (the server side only)
    seccomp: bool = True  # the server side (Ray, gRPC) needs sockets: it runs without the filter

    def all_read_only(self) -> tuple[Path, ...]:
        extra = (self.data_dir,) if self.data_dir is not None else ()
        return _dedupe((*self.read_only, *extra))


def _dedupe(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    """Resolved, existing, without paths already covered by an ancestor in the list."""
    resolved = sorted({Path(os.path.realpath(p)) for p in paths if Path(p).exists()}, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in resolved:
        if not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return tuple(kept)


def package_dir(module: str) -> Path:
    """Where a top-level package or module lives, found *without importing it* (the
    research team's code must never run in the trusted process)."""
    top = module.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as err:
        raise SandboxError(f"cannot locate module {top!r}: {err}") from err
    if spec is None:
        raise SandboxError(f"module {top!r} is not installed or not on the path")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin is None:
        raise SandboxError(f"module {top!r} has no file (a namespace or built-in module cannot be sandboxed)")
    return Path(spec.origin)


def sandbox_uid(name: str) -> int:
    """A host uid of its own for each hospital's sandbox when the node runs as root: outside
    the ranges of real accounts, distinct between hospitals, stable across runs."""
    return 2_000_000_000 + zlib.crc32(name.encode()) % 1_000_000


def python_paths() -> tuple[Path, ...]:
    """The interpreter, its standard library and the virtual environment's site-packages,
    plus fedgate itself (the worker that runs inside is fedgate code)."""
    paths = [Path(sys.base_prefix), Path(sys.prefix), Path(sys.exec_prefix), Path(sys.base_exec_prefix)]
    paths.append(Path(os.path.realpath(sys.executable)).parent)
    for entry in sys.path:
        if entry and Path(entry).is_dir() and Path(entry).resolve() != Path.cwd().resolve():
            paths.append(Path(entry))
    paths.append(package_dir("fedgate"))
    return _dedupe(tuple(paths))


def system_paths() -> tuple[Path, ...]:
    """Shared libraries and the dynamic loader, unresolved: on merged-/usr systems `/lib64`
    is a symlink that the sandbox needs as a symlink (ELF binaries name the loader by it)."""
    return tuple(Path(p) for p in (*SYSTEM_PATHS, CPU_TOPOLOGY) if os.path.lexists(p))
