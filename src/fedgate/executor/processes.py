"""The processes a fedgate command starts, and how it stops them: exactly those, all of them,
within seconds, also on Ctrl-C or SIGTERM.

The command makes itself a *child subreaper*: a process it started that double-forks (Ray's
daemons, a ServerApp's helpers) is re-parented to it instead of to init, so "everything I
started" is exactly "my descendants" — read from /proc/PID/task/*/children, never by scanning
other processes' command lines."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from fedgate.sandbox import procs

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def my_descendants() -> list[int]:
    return procs.descendants(os.getpid())


class Started:
    """The processes started from here on: a snapshot of this process's descendants now,
    so that stopping never touches one that was there before (a test runner's other children)."""

    def __init__(self) -> None:
        self.before = set(my_descendants())

    def alive(self) -> list[int]:
        return [pid for pid in my_descendants() if pid not in self.before and procs.alive(pid)]

    def stop(self, grace_s: float = 3.0, timeout_s: float = 7.0) -> list[int]:
        """SIGTERM each, SIGKILL (with its whole tree) what is left after `grace_s`, reap.
        Returns the pids that survived `timeout_s` (none unless the kernel refused)."""
        started = time.monotonic()
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        while (alive := self.alive()) and time.monotonic() - started < grace_s:
            _reap(alive)
            time.sleep(0.05)
        while (alive := self.alive()) and time.monotonic() - started < timeout_s:
            for pid in alive:
                procs.kill_tree(pid, timeout_s=1.0)
            _reap(alive)
        return self.alive()


def _reap(pids: list[int]) -> None:
    """Collect the exit of those that are our own children (others are their parents' to reap)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def in_import(frame: FrameType | None) -> bool:
    """Whether this frame runs inside Python's import system."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, `kill`) and SIGINT (Ctrl-C) both raise KeyboardInterrupt in the main
    thread, so one code path stops the run. Elsewhere (tests) it does nothing.

    Never inside an import: raised there, it can leave one of the import system's locks held,
    and the hospitals' threads, importing as they start, then wait for it forever while the main
    thread waits for them (a hang seen under CI's load). The signal is sent to the main thread
    again 50 ms later (a real signal: it also ends a blocking wait), until the import is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if in_import(frame):
            threading.Timer(0.05, signal.pthread_kill, args=(threading.main_thread().ident, signum)).start()
            return
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
