"""One hospital, as both executors run it: its folder, its gate, and the sandbox its
research team's ClientApp runs in.

    HOSPITAL_DIR/ledger/        the hospital's ledger (and its signing key)
    HOSPITAL_DIR/review.sqlite  replies held for a person's decision
    HOSPITAL_DIR/cache/<app>-<run>/   the ClientApp's cache, one per (app, run), if allowed
    HOSPITAL_DIR/logs/          the sandbox's output, per run (simulation) or per task (node)

The ClientApp's Flower context state (what it keeps between rounds) stays here too: it is
handed to the sandbox with each task and taken back afterwards, never given to the executor
around us (in simulation that is the process the research team's ServerApp runs in)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from flwr.app import Context, RecordDict

from fedgate.canonical import decimal_str
from fedgate.data.hospital import HospitalData
from fedgate.errors import FedgateError, GateRefusal
from fedgate.executor.cores import CoreScheduler
from fedgate.fab import FabRefused
from fedgate.flower_adapter import (
    context_from_bytes,
    context_to_bytes,
    message_from_bytes,
    message_to_bytes,
    recorddict_from_bytes,
    recorddict_to_bytes,
    refusal,
)
from fedgate.gate.audit import images_of
from fedgate.gate.pipeline import GENERIC_REFUSAL, Admission, AppOutcome, GatePipeline, Outcome
from fedgate.gate.release import wait_until
from fedgate.gate.update import compile_kernels as compile_gate_kernels
from fedgate.policy import Policy
from fedgate.privacy.accountant import load_accounting_library
from fedgate.sandbox.runner import AppRef, SandboxRefused, SandboxWorker
from fedgate.sandbox.spec import SANDBOX_UID, Limits, SandboxError, SandboxSpec, sandbox_uid

log = logging.getLogger("fedgate.hospital")
T = TypeVar("T")
Outgoing = bytes | memoryview  # a reply's bytes as they leave: on the gate's fast path, a view of its own buffer
AppSource = Callable[[], tuple[AppRef, dict[str, Any]]]


class InstructionHandler(Protocol):
    """A kind of instruction the hospital answers its own way (secure aggregation's stages,
    trusted training's recipes) instead of the plain gate-the-ClientApp path. It still uses
    the hospital's gate (admit/conclude) and, where it runs the ClientApp, its sandbox."""

    def handles(self, instruction: bytes) -> bool: ...

    def run(
        self, hospital: Hospital, instruction: bytes, context: bytes, arrived: float, app_source: AppSource | None
    ) -> tuple[Outgoing, bytes | None]: ...


PRELOAD = ("numpy", "torch")  # trusted libraries worth importing once per sandbox, before any fork
IMPORT = re.compile(rb"^\s*(?:import|from)\s+(numpy|torch)\b", re.MULTILINE)


def preload_for(sources: Path, limit: int = 500) -> tuple[str, ...]:
    """Which of numpy/torch the app's own sources (a package folder or one module file)
    import, read as text and never executed, so each sandbox imports them once and each
    task's child starts warm; nothing else."""
    found: set[bytes] = set()
    files = 0
    for root in (sources,):
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            files += 1
            if files > limit:
                return PRELOAD
            try:
                found.update(IMPORT.findall(path.read_bytes()))
            except OSError:
                continue
    return tuple(name for name in PRELOAD if name.encode() in found)


STATE_MAX = 64 << 20  # a ClientApp's state between rounds: generous, but bounded
RELEASE_SHARE = 0.9  # a task must answer within this share of the release horizon: the gate needs the rest


def unrecorded_refusal(instruction: bytes, arrived: float, policy: Policy) -> bytes:
    """The last resort when the ledger itself fails: the generic refusal, released at the last
    slot after the instruction arrived (a time nothing of the task chose), nothing else."""
    at = arrived + policy.release.horizon_s
    wait_until(at)
    return message_to_bytes(refusal(message_from_bytes(instruction), at, GENERIC_REFUSAL))


def sandbox_spec(
    policy: Policy,
    data_dir: Path | None,
    cache_seed: Path | None = None,
    landlock: bool = True,
    timeout_s: float | None = None,
    masks: tuple[Path, ...] = (),
    host_uid: int = SANDBOX_UID,
) -> SandboxSpec:
    """The policy's [sandbox] settings as a sandbox. A task must be answered within the
    release horizon too (a reply later than the last slot could not leave anyway)."""
    box = policy.sandbox
    timeout = min(box.timeout_s, policy.release.horizon_s) if timeout_s is None else timeout_s
    limits = Limits(
        memory_mb=box.memory_mb,
        processes=box.processes,
        cpu_seconds=box.cpu_seconds,
        scratch_mb=box.scratch_mb,
        shm_mb=box.shm_mb,
        cache_mb=box.cache_mb,
        file_size_mb=box.file_size_mb,
        timeout_s=timeout,
    )
    return SandboxSpec(
        read_only=(), data_dir=data_dir, cache=box.cache, cache_seed=cache_seed if box.cache else None, masks=masks,
        limits=limits, landlock=landlock, max_frame=box.max_frame_mb << 20, host_uid=host_uid,
    )  # fmt: skip


@dataclass(frozen=True)
class HospitalConfig:
    name: str
    folder: Path
    policy: Policy
    destination: str
    data_dir: Path | None = None
    app: AppRef | None = None
    isolation: str = "sandbox"  # "sandbox" | "none" (simulation's --no-isolation: nothing enforced)
    landlock: bool = True
    preload: tuple[str, ...] = ()  # trusted libraries the sandbox imports before forking tasks
    keep_worker: bool = True  # simulation: one sandbox per run; the node: a fresh one per task
    keep_state: bool = True  # simulation: the ClientApp's state stays here; the node: the SuperNode keeps it
    handlers: tuple[InstructionHandler, ...] = ()
    masks: tuple[Path, ...] = ()  # folders the sandbox must not see even if under a bound path (the run folder)
    data: HospitalData | None = None  # the hospital's own images, for the gate's [audit] stage
    executor: dict[str, Any] = field(default_factory=dict)
    cores: CoreScheduler | None = None  # simulation: the machine's cores, shared by every hospital's sandbox


class Hospital:
    """All calls run on this hospital's own thread: the sandbox it starts dies with the thread
    that started it (bubblewrap's --die-with-parent), so that thread must outlive it."""

    def __init__(self, config: HospitalConfig) -> None:
        self.config = config
        config.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        config.folder.chmod(0o700)  # the hospital's ledger, keys, queue and logs: the node's user only
        images = images_of(config.data) if config.data is not None else None
        self.gate = GatePipeline(config.policy, config.folder, config.name, config.destination, images=images)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fedgate-{config.name}")
        self._worker: SandboxWorker | None = None
        self._worker_key: tuple[AppRef, int] | None = None
        self._state = RecordDict()  # the ClientApp's context state between its tasks
        self._stopping = threading.Event()
        # The gate's numba kernels load (or compile, first time) and its accounting library is
        # imported now, not on the first reply's clock.
        self._thread.submit(compile_gate_kernels)
        self._thread.submit(load_accounting_library)

    def call(self, fn: Callable[[], T]) -> T:
        return self._thread.submit(fn).result()

    # -- the two entry points --------------------------------------------------------------------

    def run_task(
        self,
        instruction: bytes,
        context: bytes,
        arrived: float | None = None,
        app_source: AppSource | None = None,
    ) -> tuple[Outgoing, bytes | None]:
        """Sandboxed: gate admission, then (only if admitted) the app from `app_source` (the
        node's FAB intake; default: the configured app) in the sandbox, then the gate's
        conclusion. Returns the outgoing message and the ClientApp's new context state."""
        arrived = time.time() if arrived is None else arrived
        return self.call(lambda: self._run_task(instruction, context, arrived, app_source))

    def warm_up(self, run_id: int) -> None:
        """Start this hospital's sandbox now, on its own thread, without waiting: the sandboxes
        of all hospitals start while Flower's engine starts."""

        def start() -> None:
            assert self.config.app is not None
            try:
                self._ensure_worker(self.config.app, run_id, "")
            except (SandboxRefused, SandboxError) as err:  # the first task meets it again, and records it
                log.warning("%s: the sandbox did not start: %s", self.config.name, err)

        self._thread.submit(start)

    def check_app(self, run_id: int) -> str:
        """Before a simulation starts: does the ClientApp load in this hospital's sandbox?"""

        def check() -> str:
            assert self.config.app is not None
            return self._ensure_worker(self.config.app, run_id, "").check_app()

        return self.call(check)

    def gate_reply(self, instruction: bytes, reply: bytes | None, error: str, arrived: float) -> Outgoing:
        """--no-isolation: the ClientApp ran in the executor's own process; only gate its reply."""
        return self.call(lambda: self._gate_reply(instruction, reply, error, arrived))

    def _run_task(
        self, instruction: bytes, context: bytes, arrived: float, app_source: AppSource | None
    ) -> tuple[Outgoing, bytes | None]:
        if self._stopping.is_set():
            raise SandboxError(f"{self.config.name} is stopping; the task was not started")
        admission: Admission | None = None
        try:
            for handler in self.config.handlers:
                if handler.handles(instruction):
                    return handler.run(self, instruction, context, arrived, app_source)
            admission = self.gate.admit(instruction, arrived)
            outcome, state = None, None
            if admission.refusal is None:
                outcome, state = self.sandboxed(instruction, context, admission.run_id, app_source, arrived,
                                                kind=admission.message_type)  # fmt: skip
            return self._send(self.gate.conclude(admission, outcome), instruction), state
        except Exception as err:  # fail closed: a recorded refusal on a slot, never the error itself
            return self._failed(instruction, arrived, admission, err), None

    def _gate_reply(self, instruction: bytes, reply: bytes | None, error: str, arrived: float) -> Outgoing:
        admission: Admission | None = None
        try:
            admission = self.gate.admit(instruction, arrived)
            isolation = {"mode": "no-isolation", "enforced": False, "layers": []}
            outcome = AppOutcome(reply, error, "" if reply is not None else "client-error", isolation,
                                 dict(self.config.executor))  # fmt: skip
            return self._send(self.gate.conclude(admission, outcome), instruction)
        except Exception as err:
            return self._failed(instruction, arrived, admission, err)

    def _failed(self, instruction: bytes, arrived: float, admission: Admission | None, err: Exception) -> Outgoing:
        """Anything that failed on a reply's path: recorded as a refusal (rule gate-error) and
        released on a slot like any other reply. If even that fails (the ledger is broken), the
        generic refusal leaves at a fixed time, the last slot, and nothing else does."""
        log.exception("%s: the task failed on the gate's path; refusing it", self.config.name)
        try:
            if admission is None:
                admission = self.gate.admit(instruction, arrived)
            if admission.refusal is None:
                detail = f"{type(err).__name__}: {err}"[:500]
                admission = dataclasses.replace(admission, refusal=GateRefusal("gate-error", detail))
            return self._send(self.gate.conclude(admission, None), instruction)
        except Exception:
            log.exception("%s: the refusal could not be recorded either", self.config.name)
            return unrecorded_refusal(instruction, arrived, self.config.policy)

    def _send(self, outcome: Outcome, instruction: bytes) -> Outgoing:
        if outcome.unsendable:  # the instruction's own bytes were unreadable
            raise SandboxError("the instruction could not be read as a Flower message; nothing was sent")
        if outcome.wire is not None:  # the very bytes whose payload the ledger recorded, encoded once
            return outcome.wire
        assert outcome.built is not None
        return message_to_bytes(outcome.built)

    # -- the sandbox -------------------------------------------------------------------------------

    def _cache_seed(self, app: AppRef, run_id: int, fab: str) -> Path | None:
        """Where the cache of this (app, run) is kept between tasks: only the node needs one (a
        fresh sandbox per task); in simulation the sandbox, and its /cache tmpfs, lives for the run."""
        if self.config.keep_worker:
            return None
        digest = fab or hashlib.sha256(f"{app.reference}|{sorted(map(str, app.paths))}".encode()).hexdigest()
        return self.config.folder / "cache" / f"{digest[:16]}-{run_id}"

    def _ensure_worker(self, app: AppRef, run_id: int, fab: str) -> SandboxWorker:
        key = (app, run_id)
        if self._worker is not None and (not self._worker.alive or self._worker_key != key):
            self._worker.stop()
            self._worker = None
        if self._worker is None:
            spec = sandbox_spec(
                self.config.policy, self.config.data_dir, self._cache_seed(app, run_id, fab), self.config.landlock,
                masks=self.config.masks, host_uid=sandbox_uid(str(self.config.folder)),
            )  # fmt: skip
            name = f"sandbox-run-{run_id}.log" if self.config.keep_worker else f"task-{time.time_ns()}.log"
            worker = SandboxWorker(spec, app, self.config.folder / "logs" / str(run_id) / name, self.config.preload,
                                   self.config.policy.sandbox.allow_downgrade)  # fmt: skip
            worker.start()
            self._worker, self._worker_key = worker, key
        return self._worker

    def sandboxed(
        self,
        instruction: bytes,
        context: bytes,
        run_id: int,
        app_source: AppSource | None,
        arrived: float | None = None,
        kind: str = "",
    ) -> tuple[AppOutcome, bytes | None]:
        """The app in this hospital's sandbox: (outcome, the ClientApp's new context state). Its
        deadline runs from the instruction's arrival, so the answer is in before the last slot.
        In simulation it first waits for one of the machine's cores (`kind`, the message type,
        tells the scheduler which of this hospital's past task times to expect), and gives it
        back as soon as the ClientApp has answered: not while the gate holds the reply."""
        executor = dict(self.config.executor)
        none = {"mode": "not-run", "enforced": True, "layers": []}  # refused before any app code ran
        try:
            app, extra = app_source() if app_source is not None else (self.config.app, {})
        except FabRefused as err:
            executor["fab"] = err.report.to_json() if err.report is not None else {"rule": err.rule}
            rule = err.rule if err.rule.startswith("fab-") else f"fab-{err.rule}"  # one prefix, as the docs name it
            return AppOutcome(None, str(err)[:2000], rule, none, executor), None
        except FedgateError as err:
            return AppOutcome(None, str(err)[:2000], "fab-install", none, executor), None
        executor.update(extra)
        assert app is not None
        try:
            worker = self._ensure_worker(app, run_id, str(extra.get("fab_sha256", "")))
        except (SandboxRefused, SandboxError) as err:
            return AppOutcome(None, str(err)[:2000], "sandbox-refused", {**none, "refused": str(err)[:2000]},
                              executor), None  # fmt: skip
        layers = worker.isolation.to_json() if worker.isolation else {"enforced": False, "layers": []}
        isolation = {"mode": "downgraded" if layers.get("downgraded") else "sandbox", **layers}
        policy = self.config.policy
        deadline = (time.time() if arrived is None else arrived) + policy.release.horizon_s * RELEASE_SHARE
        deadline -= policy.audit.reserve_s()  # the gate's leakage audit runs after the app, before the last slot
        cores = self.config.cores
        with cores.task(self.config.name, kind) if cores is not None else contextlib.nullcontext():
            timeout = max(1.0, min(policy.sandbox.timeout_s, deadline - time.time()))
            result = worker.run(instruction, self._task_context(context), timeout)
        usage = {k: decimal_str(float(v)) for k, v in result.usage.items()}
        executor["sandbox"] = {"rule": result.rule, "seconds": decimal_str(result.seconds, 4), "usage": usage}
        if not self.config.keep_worker:
            worker.stop()
            self._worker = None
        if result.reply is None:
            return AppOutcome(None, result.error, result.rule or "client-error", isolation, executor), None
        state = self._take_state(result.context)
        return AppOutcome(result.reply, "", "", isolation, executor), state

    def _task_context(self, context: bytes) -> bytes:
        """The executor's context (ids, node and run config); the state is this hospital's own
        in simulation, the one the SuperNode keeps in deployment."""
        given = context_from_bytes(context)
        state = self._state if self.config.keep_state else given.state
        ctx = Context(run_id=given.run_id, node_id=given.node_id, node_config=dict(given.node_config),
                      state=state, run_config=dict(given.run_config))  # fmt: skip
        return context_to_bytes(ctx)

    def _take_state(self, context: bytes | None) -> bytes | None:
        """Only the ClientApp's `state` comes back from the sandbox, and only if it is small."""
        if context is None or len(context) > STATE_MAX:
            return None
        try:
            state = recorddict_from_bytes(recorddict_to_bytes(context_from_bytes(context).state))
        except Exception:  # whatever the bytes make the decoder raise: the state is dropped
            log.warning("%s: the ClientApp's context could not be read; its state was dropped", self.config.name)
            return None
        if self.config.keep_state:
            self._state = state
        return recorddict_to_bytes(state)

    def close(self) -> None:
        self._stopping.set()

        def stop() -> None:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
            self.gate.close()

        try:
            self.call(stop)
        finally:
            self._thread.shutdown(wait=True)
