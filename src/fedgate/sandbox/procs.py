"""The host's view of a sandbox's processes, read from /proc: its process tree, the
namespaces and credentials of its worker as the kernel holds them, what it uses, and how to
stop every process of it. Only our own descendants are ever read or signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

NAMESPACES = ("user", "pid", "net", "ipc", "uts", "mnt", "cgroup")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/*/children (no scan of other processes)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, parents before children."""
    order: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child in children(current):
            if child not in order:
                order.append(child)
                frontier.append(child)
    return order


def status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def find_by_nspid(root: int, inner_pid: int) -> int | None:
    """The host pid of the process that is `inner_pid` in the innermost PID namespace."""
    for pid in descendants(root):
        nspid = status(pid).get("NSpid", "").split()
        if len(nspid) >= 2 and nspid[-1] == str(inner_pid):
            return pid
    return None


def namespace_ids(pid: int | str) -> dict[str, str]:
    ids = {}
    for name in NAMESPACES:
        with contextlib.suppress(OSError):
            ids[name] = os.readlink(f"/proc/{pid}/ns/{name}")
    return ids


def limits(pid: int) -> dict[str, str]:
    """`/proc/PID/limits` as {name: soft limit}."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
            name, soft = line[:26].strip(), line[26:47].strip()
            found[name] = soft
    return found


def interfaces(pid: int) -> list[str]:
    """Network interfaces of the namespace `pid` lives in."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return []
    return sorted(line.split(":", 1)[0].strip() for line in lines)


# How far the resident counts statm reads may trail the pages a process has mapped. Before
# Linux 6.2 each thread caches up to 64 counter events and one fault can map 16 pages (file
# fault-around); from 6.2 to 6.15 the counters are per CPU and read approximately: off by up to
# one batch, max(32, 2 x CPUs) pages, per CPU, for each of the three counters (anon, file, shmem).
THREAD_LAG_PAGES = 64 * 16
PROCESS_LAG_PAGES = 3 * (os.cpu_count() or 1) * max(32, 2 * (os.cpu_count() or 1))
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Usage:
    resident_mb: float  # resident set sizes summed over the tree (statm): shared pages counted in each process
    cpu_seconds: float  # user + system time of live processes and of the children they reaped
    processes: int
    threads: int
    memory_mb: float | None = None  # proportional set size summed (smaps_rollup): shared pages counted once

    @property
    def resident_bound_mb(self) -> float:
        """At least the proportional set size: a process's PSS never exceeds its RSS, and the
        RSS counters trail the pages by at most the lags above."""
        lag_pages = self.threads * THREAD_LAG_PAGES + self.processes * PROCESS_LAG_PAGES
        return self.resident_mb + lag_pages * PAGE_KB / 1024


GONE = ("Z", "X")  # states of a process (or thread) that runs no more


def _stat(path: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name (state first); None: gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _memory_of(pid: int, state: str) -> Path | None:
    """Where a process's memory is read: its own /proc entry, or, for a thread-group leader that
    exited while its other threads run on (state Z, its memory still held, its own statm 0), a
    live thread's. None: every thread is gone."""
    if state != "Z":
        return Path(f"/proc/{pid}")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = _stat(task / "stat")
            if fields is not None and fields[0] not in GONE:
                return task
    return None


def usage(pids: list[int], proportional: bool = False) -> Usage:
    """What the processes use. `proportional` adds the PSS, which the kernel computes by walking
    every page table: ~10 ms for a process with torch loaded, against ~0.03 ms for statm."""
    resident_kb = memory_kb = 0
    ticks = live = threads = 0
    for pid in pids:
        fields = _stat(Path(f"/proc/{pid}/stat"))
        if fields is None:
            continue
        ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime (a leader's: its whole group's)
        where = _memory_of(pid, fields[0])
        if where is None:
            continue
        live += 1
        threads += int(fields[17])
        with contextlib.suppress(OSError, ValueError, IndexError):
            resident_kb += int((where / "statm").read_text().split()[1]) * PAGE_KB
        if not proportional:
            continue
        with contextlib.suppress(OSError, ValueError):
            for line in (where / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    memory_kb += int(line.split()[1])
                    break
    return Usage(resident_kb / 1024, ticks / CLOCK_TICKS, live, threads, memory_kb / 1024 if proportional else None)


def kill_tree(root: int, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL a sandbox: first the init of every PID namespace below `root` (the kernel then
    kills every process of that namespace at once, including any that forked or double-forked
    to escape), then the bubblewrap monitors around it. Returns the pids still alive after
    `timeout_s` (none, unless the kernel could not kill them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pids = descendants(root)
        inits = [p for p in pids if status(p).get("NSpid", "").split()[-1:] == ["1"] and p != root]
        for pid in [*inits, *reversed(pids), root]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        living = [p for p in [*descendants(root), root] if alive(p)]
        if not living:
            return []
        if time.monotonic() > deadline:
            return living
        time.sleep(0.02)


def alive(pid: int) -> bool:
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] not in GONE
