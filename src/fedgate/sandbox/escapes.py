"""Escape attempts: what a hostile ClientApp would try, each one a small function.

Used by `fedgate sandbox check` (the hospital's IT sees what holds on its own host) and by the
tests. Each attempt returns True when it *got out* (reached something it must not reach) and
raises or returns False when it was stopped. The same functions run outside the sandbox as the
control that shows each attempt would work there (so a "held" inside means something).

The ClientApp at the bottom plays them inside the sandbox and answers with a MetricRecord of
0/1 per attempt and a ConfigRecord with each attempt's error text."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_X86 = platform.machine() == "x86_64"
SYSCALL = {
    "io_uring_setup": 425,
    "bpf": 321 if _X86 else 280,
    "userfaultfd": 323 if _X86 else 282,
    "perf_event_open": 298 if _X86 else 241,
    "keyctl": 250 if _X86 else 219,
    "open_by_handle_at": 304 if _X86 else 265,
    "clone": 56 if _X86 else 220,
    "getpid": 39 if _X86 else 172,
}
IPC_CREAT, IPC_RMID = 0o1000, 0
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
TIOCSTI = 0x5412
PTRACE_ATTACH = 16


class Blocked(Exception):
    """The attempt was stopped; the message says by what (errno name)."""


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise Blocked(f"{what}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")
    return result


@dataclass(frozen=True)
class Attempt:
    name: str
    group: str  # network | ipc | files | processes | terminal | kernel | limits
    run: Callable[[dict[str, Any]], bool]
    outside: bool = True  # expected to work for an unsandboxed process (the control)
    about: str = ""


# -- network ---------------------------------------------------------------------------------


def tcp_loopback(world: dict[str, Any]) -> bool:
    with socket.create_connection(("127.0.0.1", int(world["tcp_port"])), timeout=2):
        return True


def udp_loopback(world: dict[str, Any]) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"escape", ("127.0.0.1", int(world["udp_port"])))
    return True


def unix_pathname(world: dict[str, Any]) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(str(world["unix_path"]))
    return True


def unix_abstract(world: dict[str, Any]) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect("\0" + str(world["unix_abstract"]))
    return True


def socketpair_sendto(world: dict[str, Any]) -> bool:
    """A datagram socketpair can address any pathname socket with sendto()."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        left.sendto(b"escape", str(world["unix_dgram_path"]))
    return True


def netlink(world: dict[str, Any]) -> bool:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0):
        return True


def io_uring(world: dict[str, Any]) -> bool:
    """io_uring_setup: the ring's IORING_OP_SOCKET / CONNECT bypass socket() filters."""
    params = ctypes.create_string_buffer(120)
    fd = _check(_libc.syscall(SYSCALL["io_uring_setup"], 4, params), "io_uring_setup")
    os.close(fd)
    return True


def resolve_name(world: dict[str, Any]) -> bool:
    socket.getaddrinfo("localhost", 80)
    return True


# -- ipc -------------------------------------------------------------------------------------


def sysv_shm(world: dict[str, Any]) -> bool:
    """Attach the host's shared-memory segment by its key and write into it."""
    _libc.shmat.restype = ctypes.c_void_p
    shmid = _check(_libc.shmget(int(world["shm_key"]), 0, 0), "shmget")
    address = _libc.shmat(shmid, None, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise Blocked(f"shmat: {os.strerror(ctypes.get_errno())}")
    ctypes.memmove(address, b"escaped!", 8)
    _libc.shmdt(ctypes.c_void_p(address))
    return True


def sysv_msg(world: dict[str, Any]) -> bool:
    _check(_libc.msgget(int(world["msg_key"]), 0), "msgget")
    return True


def memfd(world: dict[str, Any]) -> bool:
    """Memory in an unmapped memfd is invisible to RLIMIT_AS and to a monitor of mapped memory."""
    fd = os.memfd_create("bomb")
    os.close(fd)
    return True


def sysv_shm_create(world: dict[str, Any]) -> bool:
    """A SysV segment outlives the process that made it (until its IPC namespace ends)."""
    shmid = _check(_libc.shmget(0, 1 << 20, IPC_CREAT | 0o600), "shmget")
    _libc.shmctl(shmid, IPC_RMID, None)
    return True


def posix_mqueue(world: dict[str, Any]) -> bool:
    _libc.mq_open.restype = ctypes.c_int
    fd = _check(_libc.mq_open(str(world["mqueue"]).encode(), os.O_WRONLY), "mq_open")
    os.close(fd)
    return True


# -- files -----------------------------------------------------------------------------------


def read_secret(world: dict[str, Any]) -> bool:
    Path(str(world["secret_file"])).read_bytes()
    return True


PRIVATE = {"ledger", "keys", "review.sqlite", "logs", "flwr-home", "cache"}


def list_hospital(world: dict[str, Any]) -> bool:
    """The hospital's folder may show up as an empty skeleton around a folder bound into the
    sandbox (its data folder, an installed app); its ledger, keys, queue or logs never may."""
    seen = set(os.listdir(str(world["hospital_dir"])))
    if seen & PRIVATE:
        return True
    raise Blocked(f"only the skeleton around bound folders is visible: {sorted(seen)}")


def write_data(world: dict[str, Any]) -> bool:
    (Path(str(world["data_dir"])) / "planted.txt").write_text("x")
    return True


def delete_data(world: dict[str, Any]) -> bool:
    (Path(str(world["data_dir"])) / str(world["data_file"])).unlink()
    return True


def chmod_data(world: dict[str, Any]) -> bool:
    os.chmod(Path(str(world["data_dir"])) / str(world["data_file"]), 0o777)
    return True


def chown_data(world: dict[str, Any]) -> bool:
    os.chown(Path(str(world["data_dir"])) / str(world["data_file"]), os.getuid(), os.getgid())
    return True


def utime_data(world: dict[str, Any]) -> bool:
    os.utime(Path(str(world["data_dir"])) / str(world["data_file"]), (0, 0))
    return True


def chmod_interpreter(world: dict[str, Any]) -> bool:
    """The Python installation is shared with the node: no mode change may reach it."""
    import sys

    os.chmod(os.path.realpath(sys.executable), 0o4777)
    return True


def setuid_in_scratch(world: dict[str, Any]) -> bool:
    """A setuid file in the scratch folder: allowed to exist, never honoured (nosuid)."""
    target = Path(os.environ.get("TMPDIR", "/tmp")) / "suid-probe"
    target.write_bytes(b"#!/bin/sh\n")
    os.chmod(target, 0o4755)
    flags = ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == os.environ.get("TMPDIR", "/tmp"):
            flags = fields[5]
    if "nosuid" in flags.split(","):
        raise Blocked(f"the file was made, but its mount is nosuid ({flags})")
    return True


def read_other_cache(world: dict[str, Any]) -> bool:
    """Another run's (or another app's) cache folder: never visible."""
    Path(str(world["other_cache_file"])).read_bytes()
    return True


def cache_plants_on_host(world: dict[str, Any]) -> bool:
    """Files in the cache the host keeps for the next task: a setuid program, a world-writable
    folder, a symlink to a host file. The host checks what it wrote: plain files and folders,
    its own modes."""
    cache = Path("/cache")
    target = cache / "suid-tool"
    target.write_bytes(b"#!/bin/sh\nid\n")
    os.chmod(target, 0o6777)
    (cache / "drop").mkdir(exist_ok=True)
    os.chmod(cache / "drop", 0o777)
    with contextlib.suppress(FileExistsError):
        os.symlink("/etc/shadow", cache / "shadow")
    return False  # judged from the host after the task


def write_root(world: dict[str, Any]) -> bool:
    Path("/escape-probe").write_text("x")
    return True


def write_proc_sys(world: dict[str, Any]) -> bool:
    Path("/proc/sys/kernel/hostname").write_text("escaped")
    return True


# -- processes -------------------------------------------------------------------------------


def _node_visible(world: dict[str, Any]) -> bool:
    """Is the node's own process (pid and start time) visible from here?"""
    pid = int(world["node_pid"])
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[19] == str(world["node_start"])


def signal_node(world: dict[str, Any]) -> bool:
    if not _node_visible(world):
        raise Blocked("the node's process is not visible (PID namespace)")
    os.kill(int(world["node_pid"]), 0)
    return True


def node_environ(world: dict[str, Any]) -> bool:
    if not _node_visible(world):
        raise Blocked("the node's process is not visible (PID namespace)")
    Path(f"/proc/{world['node_pid']}/environ").read_bytes()
    return True


def ptrace_parent(world: dict[str, Any]) -> bool:
    _check(_libc.ptrace(PTRACE_ATTACH, os.getppid(), None, None), "ptrace")
    return True


def setns_back(world: dict[str, Any]) -> bool:
    fd = os.open("/proc/1/ns/net", os.O_RDONLY)
    try:
        _check(_libc.setns(fd, 0), "setns")
    finally:
        os.close(fd)
    return True


def unshare_user(world: dict[str, Any]) -> bool:
    _check(_libc.unshare(CLONE_NEWUSER), "unshare")
    return True


def clone_namespace(world: dict[str, Any]) -> bool:
    pid = _check(_libc.syscall(SYSCALL["clone"], CLONE_NEWUSER | CLONE_NEWNET | signal.SIGCHLD, 0, 0, 0, 0), "clone")
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return True


def mount_tmpfs(world: dict[str, Any]) -> bool:
    target = Path(os.environ.get("TMPDIR", "/tmp")) / "mnt"
    target.mkdir(exist_ok=True)
    _check(_libc.mount(b"none", str(target).encode(), b"tmpfs", 0, None), "mount")
    return True


def x32_abi(world: dict[str, Any]) -> bool:
    """A system call through the x32 ABI (other numbers for the same calls): the filter must
    kill the process, not let it through."""
    if not _X86:
        raise Blocked("no x32 ABI on this architecture")
    pid = os.fork()
    if pid == 0:
        _libc.syscall(0x40000000 | SYSCALL["getpid"])
        os._exit(0)  # reached only when the call was let through
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise Blocked(f"killed by signal {os.WTERMSIG(status)}")
    return True


def daemon(world: dict[str, Any]) -> bool:
    """Double-fork a session leader that sleeps; the host checks afterwards that it is gone."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
        os._exit(0)
    return False  # judged by the host: any process left after the task is an escape


# -- terminal and descriptors ----------------------------------------------------------------


def tiocsti(world: dict[str, Any]) -> bool:
    fcntl = __import__("fcntl")
    for fd in (0, 1, 2):
        try:
            fcntl.ioctl(fd, TIOCSTI, b"x")
            return True
        except OSError:
            continue
    raise Blocked("TIOCSTI refused on every inherited descriptor")


def open_tty(world: dict[str, Any]) -> bool:
    os.close(os.open("/dev/tty", os.O_RDWR))
    return True


def stray_descriptors(world: dict[str, Any]) -> bool:
    """Any descriptor beyond stdin/stdout/stderr and the task's own answer pipe."""
    from fedgate.sandbox import worker

    allowed = {0, 1, 2, worker.ANSWER_FD}
    extra = []
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        if fd not in allowed:
            extra.append(fd)
    if extra:
        return True
    raise Blocked(f"only stdin, stdout, stderr and the answer pipe ({worker.ANSWER_FD}) are open")


def stdout_marker(world: dict[str, Any]) -> bool:
    """Written to stdout and stderr; the host checks it landed in the sandbox's log file."""
    print(world["marker"], flush=True)
    os.write(2, f"{world['marker']}\n".encode())
    return False


# -- kernel ----------------------------------------------------------------------------------


def _raw(name: str, *args: int) -> Callable[[dict[str, Any]], bool]:
    def attempt(world: dict[str, Any]) -> bool:
        fd = _check(_libc.syscall(SYSCALL[name], *args), name)
        if fd > 2:
            os.close(fd)
        return True

    return attempt


def set_clock(world: dict[str, Any]) -> bool:
    time.clock_settime(time.CLOCK_REALTIME, time.time())  # the current time: harmless if it works
    return True


# -- limits (destructive: each runs as a task of its own) ------------------------------------


def fork_bomb(world: dict[str, Any]) -> bool:
    """Fork until the kernel says no; escaped when more processes than the limit exist."""
    children = []
    try:
        for _ in range(int(world["processes_limit"]) * 4):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    except OSError as err:
        world["_detail"] = f"fork failed after {len(children)} children: {err.strerror}"
    return len(children) > int(world["processes_limit"])


def disk_bomb(path: str) -> Callable[[dict[str, Any]], bool]:
    def attempt(world: dict[str, Any]) -> bool:
        limit_mb = int(world[f"disk_limit_mb:{path}"])
        written = 0
        block = b"\0" * (1 << 20)
        try:
            with open(Path(path) / "bomb.bin", "wb") as handle:
                for _ in range(limit_mb * 4):
                    handle.write(block)
                    handle.flush()
                    written += 1
        except OSError as err:
            world["_detail"] = f"stopped after {written} MiB: {err.strerror}"
        finally:
            (Path(path) / "bomb.bin").unlink(missing_ok=True)
        return written > limit_mb

    return attempt


def memory_bomb(world: dict[str, Any]) -> bool:
    """Several processes, each under its own address-space limit, together over the sandbox's
    memory limit: only a limit on the whole tree stops this."""
    per_child = int(world["memory_limit_mb"]) // 3 + 64
    for _ in range(4):
        if os.fork() == 0:
            try:
                blocks = [bytearray(per_child << 20)]
                for block in blocks:
                    block[::4096] = b"\1" * len(block[::4096])
                time.sleep(30)
            finally:
                os._exit(0)
    time.sleep(30)
    return True  # still alive after 30 s with every child holding its memory


ATTEMPTS: tuple[Attempt, ...] = (
    Attempt("tcp-loopback", "network", tcp_loopback, about="TCP to a server on the host's loopback"),
    Attempt("udp-loopback", "network", udp_loopback, about="UDP datagram to the host's loopback"),
    Attempt("unix-pathname", "network", unix_pathname, about="connect to a host Unix socket by path"),
    Attempt("unix-abstract", "network", unix_abstract, about="connect to a host abstract Unix socket"),
    Attempt("socketpair-sendto", "network", socketpair_sendto, about="socketpair + sendto(host socket path)"),
    Attempt("netlink", "network", netlink, about="netlink socket (kernel routing/audit interfaces)"),
    Attempt("io-uring", "network", io_uring, about="io_uring ring (sockets past a socket() filter)"),
    Attempt("resolve-name", "network", resolve_name, about="DNS / name resolution"),
    Attempt("sysv-shm", "ipc", sysv_shm, about="write into the host's SysV shared memory by key"),
    Attempt("sysv-msg", "ipc", sysv_msg, about="open the host's SysV message queue by key"),
    Attempt("posix-mqueue", "ipc", posix_mqueue, about="open the host's POSIX message queue"),
    Attempt("memfd", "limits", memfd, about="memory in a memfd (invisible to address-space limits)"),
    Attempt("sysv-shm-create", "limits", sysv_shm_create, about="a SysV segment that outlives its process"),
    Attempt("read-secret", "files", read_secret, about="read a file of the hospital's (a key)"),
    Attempt("list-hospital", "files", list_hospital, about="list the hospital's folder"),
    Attempt("read-other-cache", "files", read_other_cache, about="read another run's cache"),
    Attempt("write-data", "files", write_data, about="create a file in the data folder"),
    Attempt("delete-data", "files", delete_data, about="delete a file of the data folder"),
    Attempt("chmod-data", "files", chmod_data, about="chmod a data file to 0777"),
    Attempt("chown-data", "files", chown_data, about="chown a data file"),
    Attempt("utime-data", "files", utime_data, about="change a data file's times"),
    Attempt("chmod-interpreter", "files", chmod_interpreter, outside=False, about="setuid bit on the Python binary"),
    Attempt("setuid-honoured", "files", setuid_in_scratch, outside=False, about="a setuid file that would work"),
    Attempt(
        "cache-plants-on-host",
        "files",
        cache_plants_on_host,
        outside=False,
        about="plant setuid files, links, 0777 folders through the kept cache",
    ),
    Attempt("write-root", "files", write_root, outside=False, about="write a file at /"),
    Attempt("write-proc-sys", "files", write_proc_sys, outside=False, about="write a kernel setting in /proc/sys"),
    Attempt("signal-node", "processes", signal_node, about="send a signal to the node"),
    Attempt("node-environ", "processes", node_environ, about="read the node's environment"),
    Attempt("ptrace-parent", "processes", ptrace_parent, outside=False, about="ptrace the parent process"),
    Attempt("setns-back", "processes", setns_back, outside=False, about="re-enter the host's network namespace"),
    Attempt("unshare-user", "processes", unshare_user, outside=False, about="make a new user namespace"),
    Attempt("clone-namespace", "processes", clone_namespace, about="clone into new user+net namespaces"),
    Attempt("mount-tmpfs", "processes", mount_tmpfs, outside=False, about="mount a file system"),
    Attempt("x32-abi", "kernel", x32_abi, outside=False, about="a system call through the x32 ABI"),
    Attempt("bpf", "kernel", _raw("bpf", 0, 0, 0), outside=False, about="eBPF"),
    Attempt("userfaultfd", "kernel", _raw("userfaultfd", 0), outside=False, about="userfaultfd"),
    Attempt("perf-event-open", "kernel", _raw("perf_event_open", 0, 0, -1, -1, 0), outside=False, about="perf"),
    Attempt("keyctl", "kernel", _raw("keyctl", 0, -3, 0), outside=False, about="the kernel keyring"),
    Attempt("open-by-handle", "kernel", _raw("open_by_handle_at", -100, 0, 0), outside=False, about="file handles"),
    Attempt("set-clock", "kernel", set_clock, outside=False, about="set the host's clock"),
    Attempt("tiocsti", "terminal", tiocsti, outside=False, about="type into the node's terminal"),
    Attempt("open-tty", "terminal", open_tty, outside=False, about="open a controlling terminal"),
    Attempt("stray-descriptors", "terminal", stray_descriptors, outside=False, about="inherited descriptors"),
    Attempt("daemon", "processes", daemon, outside=False, about="a daemon that outlives the task"),
    Attempt("stdout-marker", "terminal", stdout_marker, outside=False, about="write to the node's log/terminal"),
)
LIMIT_ATTEMPTS: tuple[Attempt, ...] = (
    Attempt("fork-bomb", "limits", fork_bomb, outside=False, about="fork past the process limit"),
    Attempt("disk-bomb-scratch", "limits", disk_bomb("/tmp"), outside=False, about="fill the scratch folder"),
    Attempt("disk-bomb-shm", "limits", disk_bomb("/dev/shm"), outside=False, about="fill shared memory"),
    Attempt("disk-bomb-cache", "limits", disk_bomb("/cache"), outside=False, about="fill the kept cache"),
    Attempt("memory-bomb", "limits", memory_bomb, outside=False, about="fork past the memory limit"),
)
BY_NAME = {attempt.name: attempt for attempt in (*ATTEMPTS, *LIMIT_ATTEMPTS)}


def play(attempt: Attempt, world: dict[str, Any]) -> tuple[bool, str]:
    """(escaped, detail)."""
    world = dict(world)
    try:
        escaped = bool(attempt.run(world))
    except Exception as err:
        return False, f"{type(err).__name__}: {err}"
    return escaped, str(world.get("_detail", "it worked" if escaped else ""))


def _train(msg: Any, context: Any) -> Any:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    world = dict(context.run_config)
    names = str(world.pop("attempts")).split(",")
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name in names:
        escaped, detail = play(BY_NAME[name], world)
        metrics[name] = int(escaped)
        details[name] = detail[:500]
    return Message(RecordDict({"escapes": MetricRecord(metrics), "details": ConfigRecord(details)}), reply_to=msg)


def _make_app() -> Any:
    from flwr.clientapp import ClientApp

    client_app = ClientApp()
    client_app.train()(_train)
    return client_app


app = _make_app()
