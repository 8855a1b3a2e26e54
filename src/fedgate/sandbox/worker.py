"""The sandboxed worker: `python -I -B -m fedgate.sandbox.worker IN_FD OUT_FD`, started by
bubblewrap inside the sandbox. Trusted fedgate code; the research team's code only ever runs
in a child it forks per task.

    host -> worker   HELLO {app, app_paths, preload, landlock, limits, max_frame}
    worker -> host   READY {layers, pid, fds}             (after its own layers are applied)
    per task:
    host -> worker   TASK {task, deadline_s}  message-bytes  context-bytes
    worker -> host   RESULT {task, ok, error, rule}  [reply-bytes  context-bytes]

Per task the worker forks a fresh child, which loads the ClientApp, answers on a private
pipe and exits. The worker alone holds the pipes to the host: it reads the child's answer
strictly (sizes, deadline), then kills every other process of the sandbox (kill(-1) inside
its PID namespace reaches daemons that double-forked away) before it forwards anything. So
nothing of one task outlives it, and the host never reads bytes a task wrote after it ended.

The worker makes itself non-dumpable, so a child (same uid) cannot open its /proc/PID/mem or
file descriptors; ptrace and process_vm_* are denied by seccomp anyway."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fedgate.sandbox.layers import LayerResult, apply_landlock, apply_limits, landlock_abi, self_report
from fedgate.sandbox.spec import CACHE, CACHE_SEED, SCRATCH, SHM, Limits
from fedgate.sandbox.wire import WireError, recv_bytes, recv_json, send_bytes, send_json

PR_SET_DUMPABLE = 4
HELLO_KEYS = frozenset(
    {"app", "app_paths", "preload", "landlock", "limits", "max_frame", "sandboxed", "snapshot_cache"}
)
CACHE_FILES_MAX = 10_000
TASK_KEYS = frozenset({"task", "deadline_s", "check"})
ERROR_TEXT_MAX = 2000  # the ClientApp's own error text stays at the hospital, and short
ANSWER_FD = -1  # in a task's child: its one pipe to the worker (the escape suite checks for others)


def _open_fds() -> list[int]:
    """Every open descriptor (probed one by one: listing /proc/self/fd opens one more)."""
    found = []
    for fd in range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


def bootstrap(fd_in: int, fd_out: int) -> dict[str, Any]:
    """Apply the inner layers, load trusted libraries, report. Returns the HELLO."""
    hello = recv_json(fd_in, keys=HELLO_KEYS)
    limits = Limits(**{k: v for k, v in hello["limits"].items() if k != "timeout_s"})
    seed_cache()
    layers: list[LayerResult] = [apply_limits(limits), apply_landlock(bool(hello["landlock"]))]
    for module in hello["preload"]:  # trusted libraries only (numpy, torch, flwr), before any fork
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    if "torch" in sys.modules:
        warm_torch()
    import fedgate.executor.loading
    import fedgate.flower_adapter  # noqa: F401  (serde, so each child starts warm)

    layers += self_report()
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    fds = _open_fds()
    send_json(
        fd_out,
        {
            "layers": [layer.to_json() for layer in layers],
            "pid": os.getpid(),
            "fds": fds,
            "landlock_abi": landlock_abi(),
        },
    )
    return hello


def warm_torch() -> None:
    """What torch does once per process, done here, once per sandbox, so that each task's
    child starts warm: building the first optimizer imports ~800 modules (torch._dynamo, sympy,
    ...), ~2 s that every forked child paid again — the bulk of the sandbox's overhead per
    train task in `fedgate demo` (benchmarks/sandbox_overhead.py). Trusted code only: torch's
    own layers and optimizers on a tensor made here."""
    import torch

    with contextlib.suppress(Exception):  # a warm-up, never a reason for the sandbox not to start
        layer = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        loss = torch.nn.functional.cross_entropy(layer(torch.zeros(1, 1, 4, 4)), torch.zeros(1, dtype=torch.long))
        torch.autograd.backward(loss)
        optimizer.step()


def seed_cache() -> None:
    """What an earlier task of this (app, run) left in its cache, copied in before any of the
    app's code runs: regular files only (the host wrote them)."""
    seed = Path(CACHE_SEED)
    if not seed.is_dir() or not Path(CACHE).is_dir():
        return
    for source in sorted(seed.rglob("*")):
        if source.is_file() and not source.is_symlink():
            target = Path(CACHE) / source.relative_to(seed)
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # a full cache tmpfs: the app finds less cached
                shutil.copyfile(source, target)


def cache_snapshot() -> tuple[list[list[Any]], bytes]:
    """The cache's regular files after a task (every process of it is gone), for the host to
    keep for the next task of the same (app, run): [[relative path, size], ...] and their bytes."""
    index: list[list[Any]] = []
    chunks: list[bytes] = []
    root = Path(CACHE)
    for path in sorted(root.rglob("*")) if root.is_dir() else []:
        if len(index) >= CACHE_FILES_MAX:
            break
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            index.append([str(path.relative_to(root)), len(data)])
            chunks.append(data)
    return index, b"".join(chunks)


def run_child(hello: dict[str, Any], message: bytes, context: bytes, result_fd: int, check: bool = False) -> None:
    """In the forked child: the research team's code runs here and nowhere else."""
    import fedgate.sandbox.worker as this  # under `-m` this file is __main__; publish for the app
    from fedgate.executor.loading import load_client_app
    from fedgate.flower_adapter import context_from_bytes, context_to_bytes, message_from_bytes, message_to_bytes

    this.ANSWER_FD = result_fd
    cpu = int(hello["limits"]["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))  # counted afresh for each task
    try:
        sys.path[:0] = [str(p) for p in hello["app_paths"]]
        app = load_client_app(str(hello["app"]))
        if check:  # only: does the app load, and is it a ClientApp?
            send_json(result_fd, {"ok": True, "error": ""})
            send_bytes(result_fd, b"")
            send_bytes(result_fd, b"")
            return
        instruction = message_from_bytes(message)
        ctx = context_from_bytes(context)
        reply = app(instruction, ctx)
        answer = message_to_bytes(reply)
        new_context = context_to_bytes(ctx)
    except BaseException as err:
        traceback.print_exc()
        text = f"{type(err).__name__}: {err}"[:ERROR_TEXT_MAX]
        send_json(result_fd, {"ok": False, "error": text})
        return
    send_json(result_fd, {"ok": True, "error": ""})
    send_bytes(result_fd, answer)
    send_bytes(result_fd, new_context)


def _others() -> list[int]:
    """Every process of this PID namespace but init (1) and this worker, zombies excluded."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in (1, me):
            with contextlib.suppress(OSError, IndexError):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    found.append(int(entry.name))
    return found


def kill_others(timeout_s: float = 10.0) -> int:
    """kill(-1): every process this worker may signal in its namespace, but itself and init."""
    deadline = time.monotonic() + timeout_s
    killed = 0
    while (others := _others()) and time.monotonic() < deadline:
        killed = max(killed, len(others))
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        _reap()
        time.sleep(0.01)
    _reap()
    return killed


def wipe_scratch(inside: bool) -> None:
    """The task's /tmp and /dev/shm (the sandbox's own tmpfs) go with it: the next task (same
    sandbox in simulation) starts from empty scratch; the cache is the one place meant to
    persist. Only inside bubblewrap: a downgraded worker runs on the host, whose /tmp is not ours."""
    if not inside or Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]:
        return  # not in a user namespace of our own: this is the host's file system
    for root in (SCRATCH, SHM):
        if not _is_private_tmpfs(root):
            continue
        for entry in Path(root).iterdir():
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()


def _is_private_tmpfs(path: str) -> bool:
    """A tmpfs mounted exactly at `path` in this mount namespace (bubblewrap's, not the host's)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == path and fields[fields.index("-") + 1] == "tmpfs":
            return True
    return False


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def run_task(hello: dict[str, Any], fd_in: int, fd_out: int) -> None:
    task = recv_json(fd_in, keys=TASK_KEYS)
    max_frame = int(hello["max_frame"])
    message = recv_bytes(fd_in, max_frame)
    context = recv_bytes(fd_in, max_frame)
    deadline = time.monotonic() + float(task["deadline_s"])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pipe to the host, only its answer pipe
        try:
            os.close(read_end)
            for fd in (fd_in, fd_out):
                os.close(fd)
            run_child(hello, message, context, write_end, bool(task["check"]))
        finally:
            os._exit(0)
    os.close(write_end)
    result: dict[str, Any] = {"task": task["task"], "ok": False, "error": "", "rule": ""}
    frames: list[bytes] = []
    try:
        status = recv_json(read_end, deadline, keys=frozenset({"ok", "error"}))
        if status["ok"] is True:
            frames = [recv_bytes(read_end, max_frame, deadline), recv_bytes(read_end, max_frame, deadline)]
            result["ok"] = True
        else:
            result.update(error=str(status["error"])[:ERROR_TEXT_MAX], rule="client-error")
    except WireError as err:
        timed_out = time.monotonic() >= deadline
        result.update(error=str(err), rule="sandbox-timeout" if timed_out else "sandbox-protocol")
    finally:
        os.close(read_end)
        kill_others()
        wipe_scratch(bool(hello["sandboxed"]))
    send_json(fd_out, result)
    for frame in frames:
        send_bytes(fd_out, frame)
    if hello["snapshot_cache"]:
        index, data = cache_snapshot()
        send_json(fd_out, {"files": index})
        send_bytes(fd_out, data)


def main() -> None:
    fd_in, fd_out = int(sys.argv[1]), int(sys.argv[2])
    try:
        hello = bootstrap(fd_in, fd_out)
        while True:
            run_task(hello, fd_in, fd_out)
    except WireError:
        return  # the host closed the pipe: the sandbox ends here


if __name__ == "__main__":
    main()
