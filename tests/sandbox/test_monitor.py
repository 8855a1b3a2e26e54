"""The runner's tree monitor, the memory limit where no cgroup is delegated: it decides on the
proportional set size (pages a forked tree shares are counted once) but reads that expensive
figure only when the cheap resident sizes say the limit could be near."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from fedgate.sandbox import procs
from fedgate.sandbox.runner import _Monitor
from fedgate.sandbox.spec import Limits

SHARED_MB = 160
# A parent that touches SHARED_MB and forks two children that keep the pages shared: the
# resident sizes add up to about three times the proportional set size.
TREE = f"""
import os, sys, time
block = bytearray({SHARED_MB} << 20)
block[::4096] = b"\\1" * len(block[::4096])
for _ in range(2):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def tree() -> Iterator[subprocess.Popen[bytes]]:
    """The tree under a shell, as a sandbox's tree is under bubblewrap: the monitor sums the
    root's descendants."""
    launcher = ["/bin/sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, TREE]
    proc = subprocess.Popen(launcher, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    while len(procs.descendants(proc.pid)) < 3:
        time.sleep(0.01)
    yield proc
    procs.kill_tree(proc.pid)
    proc.wait()


class Counted:
    """procs.usage, counting its cheap and its page-walking calls; `enough` is set after `samples`."""

    def __init__(self, samples: int) -> None:
        self.cheap = self.proportional = 0
        self.samples = samples
        self.enough = threading.Event()
        self._usage = procs.usage

    def __call__(self, pids: list[int], proportional: bool = False) -> procs.Usage:
        if proportional:
            self.proportional += 1
        else:
            self.cheap += 1
            if self.cheap > self.samples:
                self.enough.set()
        return self._usage(pids, proportional)


def watch(
    proc: subprocess.Popen[bytes], memory_mb: int, monkeypatch: Any, samples: int = 25
) -> tuple[_Monitor, Counted]:
    counted = Counted(samples)
    monkeypatch.setattr(procs, "usage", counted)
    worker = SimpleNamespace(proc=proc, spec=SimpleNamespace(limits=Limits(memory_mb=memory_mb)))
    monitor = _Monitor(worker, timeout_s=600, interval_s=0.01)  # type: ignore[arg-type]
    monitor.start()
    # Until it kills the tree or has taken its samples (generous: a loaded machine is slow).
    deadline = time.monotonic() + 120
    while monitor._thread.is_alive() and not counted.enough.wait(0.05) and time.monotonic() < deadline:
        pass
    monitor.stop()
    return monitor, counted


def test_the_resident_bound_is_never_below_the_proportional_size(tree: subprocess.Popen[bytes]) -> None:
    use = procs.usage(procs.descendants(tree.pid), proportional=True)
    assert use.memory_mb is not None and use.memory_mb >= SHARED_MB
    assert use.resident_bound_mb >= use.resident_mb >= use.memory_mb
    assert use.resident_mb >= 2.5 * SHARED_MB  # each process counts the shared pages again


def test_a_tree_over_the_limit_is_killed(tree: subprocess.Popen[bytes], monkeypatch: Any) -> None:
    monitor, _ = watch(tree, memory_mb=SHARED_MB // 2, monkeypatch=monkeypatch)
    assert monitor.violation.startswith("memory:") and f"limit of {SHARED_MB // 2} MiB" in monitor.violation
    assert tree.wait(timeout=60) != 0


def test_pages_the_tree_shares_count_once(tree: subprocess.Popen[bytes], monkeypatch: Any) -> None:
    """Over the limit by resident sizes (about 3 x 160 MiB), under it by the proportional size:
    the tree lives, and the peak recorded is the proportional size."""
    limit = 2 * SHARED_MB
    monitor, counted = watch(tree, memory_mb=limit, monkeypatch=monkeypatch)
    assert monitor.violation == "" and tree.poll() is None
    assert counted.proportional >= counted.samples  # near the limit, every sample walks the page tables
    assert SHARED_MB <= monitor.peak["memory_mb"] < limit


def test_far_below_the_limit_the_page_tables_are_walked_once_in_ten_samples(
    tree: subprocess.Popen[bytes], monkeypatch: Any
) -> None:
    monitor, counted = watch(tree, memory_mb=16384, monkeypatch=monkeypatch)
    assert monitor.violation == "" and tree.poll() is None
    assert 1 <= counted.proportional <= counted.cheap // 10 + 1
    assert SHARED_MB <= monitor.peak["memory_mb"] < 2 * SHARED_MB  # the first sample is exact


# A process whose main thread has exited while another thread holds the memory: the leader is a
# zombie and its own /proc entry reads no memory at all; a live thread's entry reads it.
EXITED_LEADER = f"""
import ctypes, os, threading, time
ready = threading.Event()
def hold():
    block = bytearray({SHARED_MB} << 20)
    block[::4096] = b"\\1" * len(block[::4096])
    print("ready", flush=True)
    time.sleep(600)
threading.Thread(target=hold).start()
time.sleep(0.1)
ctypes.CDLL(None).syscall(60, 0)  # SYS_exit: the main thread only
"""


def test_memory_held_after_the_main_thread_exits_still_counts(monkeypatch: Any) -> None:
    launcher = ["/bin/sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, EXITED_LEADER]
    proc = subprocess.Popen(launcher, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        (leader,) = procs.descendants(proc.pid)
        while procs.status(leader).get("State", "").split()[:1] != ["Z"]:
            time.sleep(0.01)
        use = procs.usage([leader], proportional=True)
        assert use.memory_mb is not None and use.memory_mb >= SHARED_MB and use.resident_mb >= SHARED_MB
        monitor, _ = watch(proc, memory_mb=SHARED_MB // 2, monkeypatch=monkeypatch)
        assert monitor.violation.startswith("memory:")
    finally:
        procs.kill_tree(proc.pid)
        proc.wait()
