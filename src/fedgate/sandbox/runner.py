"""The host's side of a sandbox: start it, check from outside that every layer holds, hand it
tasks, read its answers strictly, and kill all of it when a task fails or the sandbox ends.

One code path for both executors: the deployment node starts a `SandboxWorker` per task and
stops it after one answer; the simulation keeps one per hospital for the run (each task still
runs in a fresh child inside, and nothing of it survives the task). Answers come back as
bytes: the gate decodes them itself."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedgate.errors import FedgateError
from fedgate.sandbox import procs
from fedgate.sandbox.bwrap import sandbox_argv
from fedgate.sandbox.cgroup import TreeCgroup
from fedgate.sandbox.seccomp import denied_syscalls, filter_fd
from fedgate.sandbox.spec import CACHE, SCRATCH, SandboxError, SandboxSpec
from fedgate.sandbox.wire import WireError, nothing_pending, recv_bytes, recv_json, send_bytes, send_json

log = logging.getLogger("fedgate.sandbox")

READY_KEYS = frozenset({"layers", "pid", "fds", "landlock_abi"})
RESULT_KEYS = frozenset({"task", "ok", "error", "rule"})
REQUIRED = ("namespaces", "privileges", "seccomp", "limits", "network", "mounts", "descriptors")
CACHE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,128}")
GRACE_S = 5.0  # the worker's own deadline fires first; the host's a little later
START_TIMEOUT_S = 300.0  # importing torch on a loaded two-core machine has taken a minute


class SandboxRefused(FedgateError):
    """Isolation could not be established and the policy does not allow a downgrade."""


@dataclass(frozen=True)
class AppRef:
    """The ClientApp to run: `module:attr`, and the folders to put on its `sys.path` (bound
    read-only; a FAB's install folder, or the folder holding a package)."""

    reference: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class Isolation:
    """Each layer as established (checked from outside where the kernel shows it)."""

    layers: tuple[dict[str, Any], ...]
    downgraded: tuple[str, ...] = ()

    @property
    def missing(self) -> list[str]:
        return [str(layer["layer"]) for layer in self.layers if layer["layer"] in REQUIRED and not layer["established"]]

    @property
    def enforced(self) -> bool:
        return not self.missing and not self.downgraded

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "enforced": self.enforced, "downgraded": list(self.downgraded)}


@dataclass(frozen=True)
class TaskOutcome:
    """A task's answer as bytes, or why there is none. `rule` names what failed:
    client-error (the app raised), sandbox-timeout, sandbox-protocol, sandbox-limit,
    sandbox-died."""

    reply: bytes | None
    context: bytes | None
    error: str = ""
    rule: str = ""
    seconds: float = 0.0
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reply is not None


def _downgraded_env(spec: SandboxSpec) -> dict[str, str]:
    """Without bubblewrap there is no private /tmp or /cache: real folders stand in."""
    import tempfile

    scratch = tempfile.mkdtemp(prefix="fedgate-downgraded-")
    return {**sandbox_env(), "HOME": scratch, "TMPDIR": scratch, "FEDGATE_CACHE": scratch}


def sandbox_env() -> dict[str, str]:
    return {
        "HOME": SCRATCH,
        "TMPDIR": SCRATCH,
        "FEDGATE_CACHE": CACHE,
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }


class SandboxWorker:
    """One sandbox. Not thread-safe: one task at a time."""

    def __init__(
        self,
        spec: SandboxSpec,
        app: AppRef,
        log_path: Path,
        preload: Sequence[str] = (),
        allow_downgrade: bool = False,
    ) -> None:
        self.spec = spec
        self.app = app
        self.log_path = log_path
        self.preload = tuple(preload)
        self.allow_downgrade = allow_downgrade
        self.proc: subprocess.Popen[bytes] | None = None
        self.isolation: Isolation | None = None
        self.worker_pid: int | None = None
        self._to_worker = -1
        self._from_worker = -1
        self._log: IO[bytes] | None = None
        self._cgroup: TreeCgroup | None = None
        self._tasks = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- start -------------------------------------------------------------------------------

    def start(self) -> Isolation:
        """Start the sandbox and check its isolation. Raises SandboxRefused when a layer is
        missing (unless the policy allows a recorded downgrade), SandboxError when the sandbox
        cannot start at all."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        as_root = os.geteuid() == 0
        if as_root and self.spec.data_dir is not None and (self.spec.data_dir.stat().st_mode & 0o005) != 0o005:
            raise SandboxError(
                f"the data folder {self.spec.data_dir} is not readable by the sandbox's own uid "
                f"(the node runs as root; the sandbox never does): run the node as the data's owner "
                f"(recommended), or chmod o+rx it"
            )
        if self.spec.cache_seed is not None:
            self.spec.cache_seed.mkdir(parents=True, exist_ok=True, mode=0o755)
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        command = [sys.executable, "-I", "-B", "-m", "fedgate.sandbox.worker", str(to_r), str(from_w)]
        spec = dataclasses.replace(self.spec, read_only=(*self.spec.read_only, *self.app.paths))
        fds = [to_r, from_w]
        env = sandbox_env()
        downgraded = ""
        try:
            try:
                seccomp = filter_fd()
                fds.append(seccomp)
                argv = sandbox_argv(spec, command, env, seccomp, as_root)
            except SandboxError as err:
                if not self.allow_downgrade:
                    raise SandboxRefused(f"{err}; the research team's code was not run") from err
                downgraded, argv = str(err), command
                env = _downgraded_env(self.spec)
            self.proc = subprocess.Popen(
                argv,
                pass_fds=tuple(fds),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                start_new_session=True,
                env=env if downgraded else None,
                cwd=env["TMPDIR"] if downgraded else None,
            )
        finally:
            for fd in fds:
                os.close(fd)
        self._to_worker, self._from_worker = to_w, from_r
        try:
            self._cgroup = TreeCgroup.create(self.spec.limits, f"fedgate-{os.getpid()}-{id(self)}")
            if self._cgroup is not None:
                self._cgroup.adopt([self.proc.pid, *procs.descendants(self.proc.pid)])
            send_json(
                self._to_worker,
                {
                    "app": self.app.reference,
                    "app_paths": [str(p) for p in self.app.paths],
                    "preload": list(self.preload),
                    "landlock": self.spec.landlock,
                    "limits": self.spec.limits.to_json(),
                    "max_frame": self.spec.max_frame,
                    "sandboxed": not downgraded,
                    "snapshot_cache": self.spec.cache_seed is not None and self.spec.cache,
                },
            )
            ready = recv_json(self._from_worker, time.monotonic() + START_TIMEOUT_S, keys=READY_KEYS)
        except (WireError, OSError) as err:
            self.stop()
            raise SandboxError(
                f"the sandbox did not start ({err}); its log: {self.log_path}: {self._log_tail()}"
            ) from err
        isolation = self._verify(ready, bool(downgraded))
        if isolation.missing and not self.allow_downgrade:
            self.stop()
            raise SandboxRefused(
                f"isolation could not be established ({', '.join(isolation.missing)}); "
                "the research team's code was not run"
            )
        if isolation.missing:
            isolation = Isolation(isolation.layers, tuple(isolation.missing))
            log.error("SANDBOX DOWNGRADED (allowed by the policy): running without %s", ", ".join(isolation.missing))
        self.isolation = isolation
        return isolation

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-800:].decode(errors="replace").strip()
        return ""

    def _verify(self, ready: dict[str, Any], downgraded: bool = False) -> Isolation:
        """The worker's own report, then the same facts read by the host from /proc."""
        assert self.proc is not None
        layers = {str(layer["layer"]): dict(layer) for layer in ready["layers"]}
        pid = self.proc.pid if downgraded else procs.find_by_nspid(self.proc.pid, int(ready["pid"]))
        self.worker_pid = pid
        if pid is None:
            layers["namespaces"] = {"layer": "namespaces", "established": False, "detail": "worker not found"}
            return Isolation(tuple(layers.values()))
        mine, theirs = procs.namespace_ids("self"), procs.namespace_ids(pid)
        shared = [name for name in procs.NAMESPACES if mine.get(name) == theirs.get(name)]
        layers["namespaces"] = {
            "layer": "namespaces",
            "established": not shared,
            "detail": "new " + ", ".join(n for n in procs.NAMESPACES if n not in shared) + " namespaces"
            + (f"; SHARED with the host: {', '.join(shared)}" if shared else ""),
        }  # fmt: skip
        status = procs.status(pid)
        host_uid = int(status.get("Uid", "0").split()[0])
        caps = [status.get(k, "") for k in ("CapEff", "CapPrm", "CapBnd")]
        layers["privileges"] = {
            "layer": "privileges",
            "established": host_uid != 0 and all(c == "0" * 16 for c in caps) and status.get("NoNewPrivs") == "1"
            and bool(layers.get("privileges", {}).get("established")),
            "detail": f"host uid {host_uid}"
            + (" (the sandbox user; the node runs as root)" if os.geteuid() == 0 else " (the node's own user)")
            + f", capabilities {'/'.join(caps)}, no_new_privs {status.get('NoNewPrivs')}",
        }  # fmt: skip
        seccomp_ok = status.get("Seccomp") == "2"
        layers["seccomp"] = {
            "layer": "seccomp",
            "established": seccomp_ok,
            "detail": f"filter mode {status.get('Seccomp')} (libseccomp); denied: {', '.join(denied_syscalls())}",
        }
        rlimits = procs.limits(pid)
        limits = self.spec.limits
        expected = {
            "Max processes": str(limits.processes),
            "Max address space": str(limits.memory_mb << 20),
            "Max cpu time": str(limits.cpu_seconds),
            "Max file size": str(limits.file_size_mb << 20),
        }
        wrong = {k: rlimits.get(k) for k, v in expected.items() if rlimits.get(k) != v}
        tree = self._cgroup.describe() if self._cgroup else "whole tree: runner's monitor (memory, CPU time)"
        layers["limits"] = {
            "layer": "limits",
            "established": not wrong,
            "detail": f"{layers.get('limits', {}).get('detail', '')}; tmpfs scratch {limits.scratch_mb} MiB, "
            f"shm {limits.shm_mb} MiB; wall clock {limits.timeout_s:.0f} s; {tree}"
            + (f"; NOT AS SET: {wrong}" if wrong else ""),
        }  # fmt: skip
        interfaces = procs.interfaces(pid)
        layers["network"] = {
            "layer": "network",
            "established": interfaces in ([], ["lo"]),
            "detail": f"interfaces: {', '.join(interfaces) or 'none'} (loopback only, no route out)",
        }
        fds = sorted(int(fd) for fd in ready["fds"])
        expected_fds = sorted({0, 1, 2, *self._worker_fds()})
        layers["descriptors"] = {
            "layer": "descriptors",
            "established": fds == expected_fds,
            "detail": f"open: {fds} (expected {expected_fds}): stdin /dev/null, stdout/stderr to "
            f"{self.log_path.name}, the two task pipes",
        }
        if "landlock" not in layers:
            layers["landlock"] = {"layer": "landlock", "established": False, "detail": "not reported"}
        return Isolation(tuple(layers[name] for name in sorted(layers)))

    def _worker_fds(self) -> tuple[int, ...]:
        assert self.proc is not None
        args = self.proc.args
        assert isinstance(args, list)
        return int(args[-2]), int(args[-1])

    # -- tasks -------------------------------------------------------------------------------

    def check_app(self, timeout_s: float = 300.0) -> str:
        """Load the app in a task's child and say what is wrong with it ("" when it loads and
        is a ClientApp). The worker itself never imports it."""
        outcome = self.run(b"", b"", timeout_s, check=True)
        return "" if outcome.ok else outcome.error or outcome.rule

    def run(self, message: bytes, context: bytes, timeout_s: float | None = None, check: bool = False) -> TaskOutcome:
        """One task. Any failure of the sandbox kills it; the next `run` needs a new start()."""
        if not self.alive or self.isolation is None:
            raise SandboxError("the sandbox is not running")
        timeout = float(timeout_s if timeout_s is not None else self.spec.limits.timeout_s)
        self._tasks += 1
        task = self._tasks
        started = time.monotonic()
        self._mark(f"task {task}: started")
        monitor = _Monitor(self, timeout)
        try:
            if not nothing_pending(self._from_worker):
                raise WireError("the sandbox wrote before it was asked")
            send_json(self._to_worker, {"task": task, "deadline_s": timeout, "check": check})
            send_bytes(self._to_worker, message)
            send_bytes(self._to_worker, context)
            monitor.start()
            deadline = started + timeout + GRACE_S
            result = recv_json(self._from_worker, deadline, keys=RESULT_KEYS)
            if result["task"] != task:
                raise WireError(f"answer for task {result['task']}, expected {task}")
            frames = (
                [recv_bytes(self._from_worker, self.spec.max_frame, deadline) for _ in range(2)] if result["ok"] else []
            )
            if self.spec.cache_seed is not None and self.spec.cache:
                self._keep_cache(deadline)
        except (WireError, OSError) as err:
            monitor.stop()
            violation = monitor.violation
            self.stop()
            seconds = time.monotonic() - started
            rule = "sandbox-limit" if violation else "sandbox-timeout" if seconds >= timeout else "sandbox-died"
            if isinstance(err, WireError) and "over the limit" in str(err):
                rule = "sandbox-protocol"
            self._mark(f"task {task}: {rule}: {violation or err}")
            return TaskOutcome(None, None, violation or str(err), rule, seconds, monitor.peak)
        monitor.stop()
        leftovers = procs.descendants(self.worker_pid) if self.worker_pid else []
        if leftovers:  # the worker said it cleaned up; the host does not take its word
            self._mark(f"task {task}: processes left after the task: {leftovers}; sandbox stopped")
            self.stop()
        seconds = time.monotonic() - started
        if not result["ok"]:
            self._mark(f"task {task}: {result['rule']}")
            if result["rule"] != "client-error":  # a timeout or a broken answer: the whole sandbox goes
                self.stop()
            return TaskOutcome(None, None, str(result["error"]), str(result["rule"]), seconds, monitor.peak)
        self._mark(f"task {task}: answered in {seconds:.1f} s")
        return TaskOutcome(frames[0], frames[1], "", "", seconds, monitor.peak)

    def _keep_cache(self, deadline: float) -> None:
        """The worker's snapshot of /cache, written to the host folder by us: regular files,
        plain names, mode 0644 in 0755 folders (never the sandbox's modes, links or setuid bits),
        at most the cache's size, replacing the folder's old contents."""
        assert self.spec.cache_seed is not None
        index = recv_json(self._from_worker, deadline, keys=frozenset({"files"}))["files"]
        data = recv_bytes(self._from_worker, self.spec.limits.cache_mb << 20, deadline)
        if not isinstance(index, list) or sum(int(size) for _, size in index) != len(data):
            raise WireError("the cache snapshot does not add up")
        staging = Path(tempfile.mkdtemp(prefix=".cache-", dir=self.spec.cache_seed.parent))
        staging.chmod(0o755)  # the sandbox's uid reads it at /cache-seed next time
        offset = 0
        for name, size in index:
            parts = Path(str(name)).parts
            if not parts or len(parts) > 16 or not all(CACHE_NAME.fullmatch(p) and p not in (".", "..") for p in parts):
                raise WireError(f"the cache snapshot names {str(name)[:80]!r}")
            target = staging.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data[offset : offset + int(size)])
            offset += int(size)
        old = self.spec.cache_seed.with_name(self.spec.cache_seed.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(self.spec.cache_seed, old)
        os.replace(staging, self.spec.cache_seed)
        shutil.rmtree(old, ignore_errors=True)

    def _mark(self, text: str) -> None:
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.write(f"\n=== fedgate {time.strftime('%H:%M:%S')} {text} ===\n".encode())
                self._log.flush()

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Kill every process of the sandbox (its PID namespace at once) and close the pipes."""
        if self.proc is not None:
            survivors = procs.kill_tree(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if survivors:
                log.error("sandbox processes %s survived SIGKILL", survivors)
        for fd in (self._to_worker, self._from_worker):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_worker = self._from_worker = -1
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SandboxWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Monitor:
    """Sums memory and CPU time over every process of the sandbox while a task runs, and kills
    the sandbox past the limits: per-process rlimits alone are bypassed by fork.

    Memory is the proportional set size (shared pages counted once), which the kernel computes
    by walking page tables: read every 0.2 s for a tree with torch loaded, it took a fifth of a
    core from the training it watched. So each sample reads the resident sizes (a bound on the
    PSS from above, at no cost) and the PSS only when that bound reaches the limit, and every
    `exact_every` samples for the peak the ledger records. The decision is the PSS's either way."""

    def __init__(self, worker: SandboxWorker, timeout_s: float, interval_s: float = 0.2, exact_every: int = 10) -> None:
        self.worker = worker
        self.interval_s = interval_s
        self.exact_every = exact_every
        self.violation = ""
        self.peak: dict[str, Any] = {"memory_mb": 0.0, "cpu_seconds": 0.0, "processes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fedgate-sandbox-monitor")
        self._baseline = self._sample(0).cpu_seconds if worker.proc else 0.0

    def _sample(self, count: int) -> procs.Usage:
        assert self.worker.proc is not None
        pids = procs.descendants(self.worker.proc.pid)
        exact = count % self.exact_every == 1
        use = procs.usage(pids, proportional=exact)
        if not exact and use.resident_bound_mb >= self.worker.spec.limits.memory_mb:
            use = procs.usage(pids, proportional=True)
        return use

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        limits = self.worker.spec.limits
        count = 0
        while not self._stop.wait(self.interval_s):
            count += 1
            use = self._sample(count)
            cpu = use.cpu_seconds - self._baseline
            self.peak = {
                "memory_mb": round(max(self.peak["memory_mb"], use.memory_mb or 0.0), 1),
                "cpu_seconds": round(max(self.peak["cpu_seconds"], cpu), 1),
                "processes": max(self.peak["processes"], use.processes),
            }
            if use.memory_mb is not None and use.memory_mb > limits.memory_mb:
                self.violation = f"memory: {use.memory_mb:.0f} MiB over the limit of {limits.memory_mb} MiB"
            elif cpu > limits.cpu_seconds:
                self.violation = f"cpu time: {cpu:.0f} s over the limit of {limits.cpu_seconds} s"
            if self.violation and self.worker.proc is not None:
                procs.kill_tree(self.worker.proc.pid)
                return


def run_command(spec: SandboxSpec, command: Sequence[str], timeout_s: float | None = None) -> int:
    """`fedgate sandbox run`: any command in exactly the sandbox a task gets (the same
    bubblewrap line, seccomp filter, limits and Landlock), its output on this terminal."""
    import json

    as_root = os.geteuid() == 0
    seccomp = filter_fd()
    inner = [sys.executable, "-I", "-B", "-m", "fedgate.sandbox.enter", "1" if spec.landlock else "0",
             json.dumps(spec.limits.to_json()), "--", *command]  # fmt: skip
    try:
        proc = subprocess.Popen(sandbox_argv(spec, inner, sandbox_env(), seccomp, as_root), pass_fds=(seccomp,),
                                start_new_session=True)  # fmt: skip
    finally:
        os.close(seccomp)
    try:
        return proc.wait(timeout=timeout_s if timeout_s is not None else spec.limits.timeout_s)
    except subprocess.TimeoutExpired:
        return 124
    finally:
        procs.kill_tree(proc.pid)
        proc.wait()
