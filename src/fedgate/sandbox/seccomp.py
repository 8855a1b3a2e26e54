"""The sandbox's system-call filter, loaded by bubblewrap just before it executes the worker.

Built with libseccomp (through `pyseccomp`, a small ctypes binding to the libseccomp2 that
systemd and Flatpak use) rather than by hand: libseccomp generates the BPF for each
architecture, compares 64-bit arguments correctly and kills system calls made through other
ABIs (i386 via int 0x80, x32 on x86_64), which is where hand-written filters usually fail.

Default-allow, with a written reason for every denial below. Why not default-deny: the
research team's code is arbitrary Python with NumPy and PyTorch, whose system calls change
with every release; a default-deny list breaks them in ways nobody can debug, while the
dangerous calls are few and well known (Docker's, Flatpak's and Chromium's lists agree on
them). The layers around seccomp (namespaces, a root built from nothing, read-only mounts,
limits) carry the rest of the containment; seccomp removes the calls that could undo those
layers or reach past them."""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from fedgate.sandbox.spec import SandboxError

# clone(2) flags that create namespaces: a sandboxed process must not build its own.
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
TIOCSTI = 0x5412  # push a character into a terminal's input: keystroke injection
TIOCLINUX = 0x541C  # the Linux console's selection paste: the same on a VT
PER_LINUX = 0


@dataclass(frozen=True)
class Denial:
    syscalls: tuple[str, ...]
    why: str
    error: int = errno.EPERM


DENIALS: tuple[Denial, ...] = (
    Denial(
        ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4"),
        "no sockets of any family: a network namespace still leaves pathname Unix sockets, and a "
        "socketpair can sendto() a host socket by path; netlink, vsock and the rest are kernel surface",
    ),
    Denial(
        ("io_uring_setup", "io_uring_enter", "io_uring_register"),
        "io_uring performs socket(), connect() and file I/O from a kernel ring that seccomp never sees",
    ),
    Denial(
        (
            "unshare",
            "setns",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "open_tree",
            "move_mount",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
        ),
        "namespaces and mounts: the sandbox's own view of the system must not be rebuilt from inside",
    ),
    Denial(
        ("clone3",), "clone3 hides its flags in memory seccomp cannot read; glibc falls back to clone", errno.ENOSYS
    ),
    Denial(
        ("ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd"),
        "no reading or writing of another process's memory, file descriptors or state",
    ),
    Denial(
        (
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "keyctl",
            "add_key",
            "request_key",
            "open_by_handle_at",
            "name_to_handle_at",
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "syslog",
            "uselib",
            "ioperm",
            "iopl",
            "lookup_dcookie",
            "nfsservctl",
            "vhangup",
            "fanotify_init",
        ),
        "kernel attack surface no training code needs (eBPF, perf, keyrings, file handles that bypass "
        "the mount view, modules, the kernel log)",
    ),
    Denial(
        ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
        "the host's clock belongs to the host (the ledger's times come from it)",
    ),
    Denial(
        ("memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl"),
        "memory that neither the address-space limit nor the tree monitor sees (an unmapped memfd, SysV "
        "segments that outlive their process); without a delegated memory cgroup nothing else would bound it",
    ),
)


def build_filter() -> bytes:
    """The filter as BPF bytes, for `bwrap --seccomp FD`."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as err:  # pyseccomp loads libseccomp.so.2 at import
        raise SandboxError(
            f"cannot load libseccomp ({err}); install the libseccomp2 package (Debian/Ubuntu: apt install libseccomp2)"
        ) from err
    try:
        rules = sc.SyscallFilter(sc.ALLOW)
        rules.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # i386 / x32 system calls: the process dies
        for denial in DENIALS:
            for name in denial.syscalls:
                if _exists(sc, name):
                    rules.add_rule(sc.ERRNO(denial.error), name)
        # libseccomp compares one masked value per rule: deny clone when (flags & bit) == bit,
        # one rule per namespace bit.
        for bit in range(32):
            if CLONE_NEW_FLAGS & (1 << bit):
                rules.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, 1 << bit, 1 << bit))
        for request in (TIOCSTI, TIOCLINUX):  # compared on the low 32 bits: ioctl's request is an int
            rules.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
        # personality(): only the default Linux personality; the others re-enable legacy
        # behaviours (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE) that weaken the process itself.
        rules.add_rule(sc.ERRNO(errno.EPERM), "personality", sc.Arg(0, sc.NE, PER_LINUX))
        with tempfile.TemporaryFile() as handle:
            rules.export_bpf(handle)
            handle.seek(0)
            return handle.read()
    except OSError as err:
        raise SandboxError(f"libseccomp refused the sandbox's filter: {err}") from err


def _exists(sc: Any, name: str) -> bool:
    """Whether this architecture has the call at all (e.g. no `ioperm` on aarch64)."""
    try:
        return int(sc.resolve_syscall(sc.system_arch(), name)) >= 0
    except (ValueError, OSError):
        return False


def denied_syscalls() -> list[str]:
    """Every denied call by name, for the isolation report."""
    names = [name for denial in DENIALS for name in denial.syscalls]
    return [*names, "clone(CLONE_NEW*)", "ioctl(TIOCSTI, TIOCLINUX)", "personality(anything but PER_LINUX)"]


def filter_fd() -> int:
    """A sealed-off anonymous file holding the filter, inheritable, positioned at 0."""
    data = build_filter()
    fd = os.memfd_create("fedgate-seccomp", 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
