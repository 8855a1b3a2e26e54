"""The isolation layers, applied by the child to itself before it loads untrusted code.

1. Resource limits (memory, CPU time, open files, file size).
2. A new user + network namespace: no interfaces, so no TCP/UDP/DNS anywhere; the user
   namespace means "root" inside holds no capability over the host's namespaces.
3. Landlock (file system): read-only access to the Python installation, the app and the
   data folder; read-write only to a private scratch folder; nothing else. On kernels with
   Landlock ABI >= 4 it also denies every TCP bind/connect, and >= 6 abstract Unix sockets.
4. seccomp: socket() fails with EPERM (this is what closes *pathname* Unix sockets, which a
   network namespace leaves reachable), as do setns/unshare/mount/ptrace/bpf and friends,
   so the layers above cannot be undone.

Why Landlock and seccomp rather than a mount namespace with pivot_root: both work without
privileges and cannot be undone, and Landlock names exactly the allowed folders instead of
rebuilding a root file system. Each layer reports whether it was established; the runner
refuses to run untrusted code when one was not, unless the policy allows a recorded downgrade."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Landlock (uapi/linux/landlock.h); the syscall numbers are the same on x86_64 and aarch64.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ALL_ABI1 = (1 << 13) - 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_ONLY_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

# seccomp: syscalls that open a socket or could undo the layers. Numbers per architecture.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
DENIED_SYSCALLS = {
    "x86_64": {
        "socket": 41,
        "connect": 42,
        "setns": 308,
        "unshare": 272,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "bpf": 321,
        "perf_event_open": 298,
        "init_module": 175,
        "finit_module": 313,
        "kexec_load": 246,
        "add_key": 248,
        "keyctl": 250,
        "request_key": 249,
        "userfaultfd": 323,
        "open_by_handle_at": 304,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsmount": 432,
    },
    "aarch64": {
        "socket": 198,
        "connect": 203,
        "setns": 268,
        "unshare": 97,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "bpf": 280,
        "perf_event_open": 241,
        "init_module": 105,
        "finit_module": 273,
        "kexec_load": 104,
        "add_key": 217,
        "keyctl": 219,
        "request_key": 218,
        "userfaultfd": 282,
        "open_by_handle_at": 265,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsmount": 432,
    },
}


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 16384
    cpu_seconds: int = 3600
    open_files: int = 1024
    file_size_mb: int = 4096


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
    try:
        for which, value in (
            (resource.RLIMIT_AS, limits.memory_mb << 20),
            (resource.RLIMIT_CPU, limits.cpu_seconds),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
        ):
            resource.setrlimit(which, (value, value))
    except (ValueError, OSError) as err:
        return LayerResult("limits", False, str(err))
    return LayerResult(
        "limits",
        True,
        f"memory {limits.memory_mb} MiB, cpu {limits.cpu_seconds} s, "
        f"{limits.open_files} files, file size {limits.file_size_mb} MiB",
    )


def enter_namespaces() -> LayerResult:
    """New user and network namespaces, this process mapped to the same uid/gid."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return LayerResult("network-namespace", False, f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {_err()}")
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError as err:
        return LayerResult("network-namespace", False, f"cannot map ids in the user namespace: {err}")
    # Asked over netlink, not /sys/class/net: sysfs still shows the host's namespace.
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces not in ([], ["lo"]):
        return LayerResult("network-namespace", False, f"the new namespace has interfaces {interfaces}")
    return LayerResult("network-namespace", True, f"new network namespace, interfaces: {interfaces or 'none'} (down)")


def landlock_abi() -> int:
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return int(abi) if abi > 0 else 0


def apply_landlock(read_only: Iterable[Path], read_write: Iterable[Path]) -> LayerResult:
    abi = landlock_abi()
    if abi < 1:
        return LayerResult("landlock", False, f"Landlock is not available on this kernel: {_err()}")
    handled_fs = FS_ALL_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    handled_fs |= FS_IOCTL_DEV if abi >= 5 else 0
    handled_net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr[:size]), size, 0)
    if ruleset < 0:
        return LayerResult("landlock", False, f"landlock_create_ruleset failed: {_err()}")
    read_rights = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    try:
        for paths, rights in ((read_only, read_rights), (read_write, handled_fs)):
            for path in paths:
                if not path.exists():
                    continue
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    allowed = rights & handled_fs & (FILE_ONLY_RIGHTS if not path.is_dir() else ~0)
                    rule = struct.pack("=Qi", allowed, fd)
                    if _libc.syscall(
                        SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.c_char_p(rule), 0
                    ):
                        return LayerResult("landlock", False, f"landlock_add_rule({path}) failed: {_err()}")
                finally:
                    os.close(fd)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return LayerResult("landlock", False, f"prctl(NO_NEW_PRIVS) failed: {_err()}")
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            return LayerResult("landlock", False, f"landlock_restrict_self failed: {_err()}")
    finally:
        os.close(ruleset)
    extra = (", TCP bind/connect denied" if handled_net else "") + (", abstract Unix sockets scoped" if scoped else "")
    return LayerResult("landlock", True, f"ABI {abi}: file system limited to the allowed folders{extra}")


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def apply_seccomp() -> LayerResult:
    machine = platform.machine()
    if machine not in DENIED_SYSCALLS:
        return LayerResult("seccomp", False, f"no syscall table for architecture {machine}")
    ld_w_abs, jeq_k, jge_k, ret_k = 0x20, 0x15, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    deny = 0x00050000 | errno.EPERM
    program = [_bpf(ld_w_abs, 4), _bpf(jeq_k, AUDIT_ARCH[machine], jt=1), _bpf(ret_k, kill), _bpf(ld_w_abs, 0)]
    if machine == "x86_64":  # the x32 ABI would offer the same calls under other numbers
        program += [_bpf(jge_k, 0x40000000, jf=1), _bpf(ret_k, deny)]
    for number in DENIED_SYSCALLS[machine].values():
        program += [_bpf(jeq_k, number, jf=1), _bpf(ret_k, deny)]
    program.append(_bpf(ret_k, allow))
    filters = ctypes.create_string_buffer(b"".join(program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(filters))  # struct sock_fprog, native layout
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return LayerResult("seccomp", False, f"prctl(NO_NEW_PRIVS) failed: {_err()}")
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        return LayerResult("seccomp", False, f"prctl(SECCOMP) failed: {_err()}")
    return LayerResult("seccomp", True, f"denied: {', '.join(DENIED_SYSCALLS[machine])}")
