"""The layers the sandboxed worker applies to itself, inside bubblewrap, before any of the
research team's code is imported: resource limits and Landlock. Then it looks at itself and
reports what holds (the runner checks the same facts again from outside, through /proc).

Landlock is a further layer where the kernel has it: inside bubblewrap's root every visible
path is already one we allowed, so Landlock adds a second, independent lock on writes (only
the scratch, shared-memory and cache mounts) and, from ABI 6, scopes signals and abstract
Unix sockets to the sandbox. Everything must also hold without it (hospital kernels: Debian
12 is ABI 2, Ubuntu 22.04 none), which `fedgate sandbox check --no-landlock` shows."""

from __future__ import annotations

import ctypes
import os
import resource
import struct
from dataclasses import dataclass
from pathlib import Path

from fedgate.sandbox.spec import CACHE, SCRATCH, SHM, Limits

_libc = ctypes.CDLL(None, use_errno=True)

PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
FS_ALL_ABI1 = (1 << 13) - 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
WRITABLE = (SCRATCH, SHM, CACHE, "/dev/null")


@dataclass(frozen=True)
class LayerResult:
    layer: str
    established: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"layer": self.layer, "established": self.established, "detail": self.detail}


def _err() -> str:
    return os.strerror(ctypes.get_errno())


def apply_limits(limits: Limits) -> LayerResult:
    """Per-process limits, inherited by every child. RLIMIT_NPROC counts processes of this
    uid in this user namespace, i.e. the sandbox's own process tree, and the kernel enforces
    it because the sandbox is never uid 0 on the host."""
    settings = (
        (resource.RLIMIT_AS, limits.memory_mb << 20),
        (resource.RLIMIT_NPROC, limits.processes),
        (resource.RLIMIT_CPU, limits.cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    )
    try:
        for which, value in settings:
            resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as err:
        return LayerResult("limits", False, f"setrlimit failed: {err}")
    return LayerResult(
        "limits",
        True,
        f"per process: address space {limits.memory_mb} MiB, cpu {limits.cpu_seconds} s, file size "
        f"{limits.file_size_mb} MiB, {limits.open_files} files, no core dumps; "
        f"whole sandbox: {limits.processes} processes",
    )


def landlock_abi() -> int:
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return int(abi) if abi > 0 else 0


def apply_landlock(enabled: bool = True) -> LayerResult:
    if not enabled:
        return LayerResult("landlock", False, "off (--no-landlock: as on a kernel without Landlock)")
    abi = landlock_abi()
    if abi < 1:
        return LayerResult("landlock", False, f"not available on this kernel: {_err()}")
    handled_fs = FS_ALL_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    handled_fs |= FS_IOCTL_DEV if abi >= 5 else 0
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr[:size]), size, 0)
    if ruleset < 0:
        return LayerResult("landlock", False, f"landlock_create_ruleset failed: {_err()}")
    try:
        rules = [("/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR)]
        rules += [(path, handled_fs) for path in WRITABLE if os.path.exists(path)]
        for path, rights in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                is_dir = Path(path).is_dir()
                file_rights = FS_EXECUTE | FS_READ_FILE | (1 << 1) | FS_TRUNCATE | FS_IOCTL_DEV
                allowed = rights & handled_fs & (~0 if is_dir else file_rights)
                rule = struct.pack("=Qi", allowed, fd)
                if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.c_char_p(rule), 0):
                    return LayerResult("landlock", False, f"landlock_add_rule({path}) failed: {_err()}")
            finally:
                os.close(fd)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return LayerResult("landlock", False, f"prctl(NO_NEW_PRIVS) failed: {_err()}")
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return LayerResult("landlock", False, f"landlock_restrict_self failed: {_err()}")
    finally:
        os.close(ruleset)
    extra = ", TCP denied" if handled_net else ""
    extra += ", signals and abstract Unix sockets scoped to the sandbox" if scoped else ""
    return LayerResult("landlock", True, f"ABI {abi}: writes only to {', '.join(WRITABLE)}{extra}")


def _status() -> dict[str, str]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def writable_mounts() -> list[str]:
    """Mount points of this view that are not read-only (mountinfo field 6 holds the flags)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if "ro" not in fields[5].split(","):
            found.append(fields[4])
    return sorted(found)


def self_report() -> list[LayerResult]:
    """What this process can see of its own confinement, just before untrusted code runs."""
    status = _status()
    seccomp = status.get("Seccomp") == "2"
    caps = status.get("CapEff", "") == "0" * 16 and status.get("CapBnd", "") == "0" * 16
    no_new_privs = status.get("NoNewPrivs") == "1"
    # /proc (its writable files are this namespace's own), /dev/pts (no terminal is open) and
    # the character devices bubblewrap binds (null, zero, full, random, urandom, tty).
    devices = {f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom", "tty", "pts")}
    allowed_writable = {SCRATCH, SHM, CACHE, "/proc", *devices}
    writable = writable_mounts()
    unexpected = [m for m in writable if m not in allowed_writable]
    return [
        LayerResult(
            "seccomp", seccomp, f"mode {status.get('Seccomp')}, {status.get('Seccomp_filters', '?')} filter(s)"
        ),
        LayerResult(
            "privileges",
            caps and no_new_privs and os.getuid() != 0,
            f"uid {os.getuid()} gid {os.getgid()}, effective and bounding capabilities "
            f"{status.get('CapEff')}/{status.get('CapBnd')}, no_new_privs {status.get('NoNewPrivs')}",
        ),
        LayerResult(
            "mounts",
            not unexpected,
            f"writable: {', '.join(writable)}" + (f"; UNEXPECTED: {', '.join(unexpected)}" if unexpected else ""),
        ),
    ]
