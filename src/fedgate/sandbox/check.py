"""`fedgate sandbox check`: play every escape attempt on this host, outside the sandbox (the
control: it works there) and inside it (it must not), and check from the host what no
attempt can report about itself: that no listener saw a connection, the host's shared memory
and the data folder are unchanged, output went to the task's log, and no process outlived
the task or the sandbox."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import secrets
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedgate.sandbox import escapes, procs
from fedgate.sandbox.runner import AppRef, Isolation, SandboxWorker
from fedgate.sandbox.spec import CACHE, SCRATCH, SHM, Limits, SandboxSpec

CHECK_LIMITS = Limits(
    memory_mb=1024,
    processes=64,
    cpu_seconds=120,
    scratch_mb=64,
    shm_mb=16,
    cache_mb=64,
    file_size_mb=256,
    open_files=256,
    timeout_s=180.0,
)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
IPC_CREAT, IPC_RMID = 0o1000, 0
NO_ANSWER = None  # an attempt the sandbox did not answer for: neither held nor escaped


@dataclass(frozen=True)
class CheckRow:
    name: str
    group: str
    about: str
    outside: str  # "worked" | "failed" | "not tried"
    inside: str  # "held" | "ESCAPED"
    detail: str

    @property
    def held(self) -> bool:
        return self.inside == "held"


@dataclass
class CheckReport:
    rows: list[CheckRow] = field(default_factory=list)
    isolation: Isolation | None = None
    landlock: bool = True
    limits: Limits = CHECK_LIMITS

    @property
    def all_held(self) -> bool:
        return (
            bool(self.rows)
            and all(r.held for r in self.rows)
            and self.isolation is not None
            and (self.isolation.enforced)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "all_held": self.all_held,
            "landlock": self.landlock,
            "limits": self.limits.to_json(),
            "isolation": self.isolation.to_json() if self.isolation else None,
            "attempts": [row.__dict__ for row in self.rows],
        }


class World:
    """Things on the host an escape would reach: listeners, IPC objects, a secret, data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.hospital_dir = root / "hospital"
        self.cache_dir = root / "hospital" / "cache" / "this-run"
        self.hits: list[str] = []
        self._closers: list[Callable[[], None]] = []

    def __enter__(self) -> World:
        self.data_dir.mkdir(parents=True)
        (self.data_dir / "scan-0.png").write_bytes(b"\x89PNG pixels of a patient")
        os.chmod(self.data_dir / "scan-0.png", 0o644)
        os.chmod(self.data_dir, 0o755)
        (self.hospital_dir / "ledger").mkdir(parents=True)
        (self.hospital_dir / "ledger" / "signing.key").write_text("private key")
        other = self.hospital_dir / "cache" / "other-run"
        other.mkdir(parents=True)
        (other / "decoded.npz").write_text("another run's data")
        self.tag = secrets.token_hex(6)
        self._listen()
        self._ipc()
        return self

    def _serve(self, sock: socket.socket, name: str, stream: bool) -> None:
        def loop() -> None:
            while True:
                try:
                    if stream:
                        conn, _ = sock.accept()
                        conn.close()
                    else:
                        sock.recv(64)
                except OSError:
                    return
                self.hits.append(name)

        threading.Thread(target=loop, daemon=True).start()
        self._closers.append(sock.close)

    def _listen(self) -> None:
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        self.unix_path = str(self.root / "engine.sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(self.unix_path)
        unix.listen()
        self.unix_dgram_path = str(self.root / "engine.dgram")
        dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dgram.bind(self.unix_dgram_path)
        abstract = socket.socket(socket.AF_UNIX)
        self.abstract = f"fedgate-check-{self.tag}"
        abstract.bind("\0" + self.abstract)
        abstract.listen()
        for path in (self.unix_path, self.unix_dgram_path):
            os.chmod(path, 0o777)  # reachable by the sandbox's uid, were it not for the sandbox
        self.tcp_port, self.udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        for sock, name, stream in ((tcp, "tcp", True), (udp, "udp", False), (unix, "unix", True)):
            self._serve(sock, name, stream)
        self._serve(dgram, "unix-dgram", False)
        self._serve(abstract, "unix-abstract", True)

    def _ipc(self) -> None:
        self.shm_key = 0x6FED0000 + secrets.randbelow(0xFFFF)
        self.shm_id = _libc.shmget(self.shm_key, 4096, IPC_CREAT | 0o666)
        self.msg_key = self.shm_key + 1
        self.msg_id = _libc.msgget(self.msg_key, IPC_CREAT | 0o666)
        self.mqueue = f"/fedgate-check-{self.tag}"
        _libc.mq_open.restype = ctypes.c_int
        self.mq_fd = _libc.mq_open(self.mqueue.encode(), os.O_CREAT | os.O_RDWR, 0o666, None)

    def shm_bytes(self) -> bytes:
        address = _libc.shmat(self.shm_id, None, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            return b""
        data = ctypes.string_at(address, 16)
        _libc.shmdt(ctypes.c_void_p(address))
        return data

    def reset_shm(self) -> None:
        address = _libc.shmat(self.shm_id, None, 0)
        if address not in (None, ctypes.c_void_p(-1).value):
            ctypes.memset(address, 0, 4096)
            _libc.shmdt(ctypes.c_void_p(address))

    def data_state(self) -> str:
        """Names, modes, owners, times and contents of the data folder, as one hash."""
        digest = hashlib.sha256()
        for path in sorted([self.data_dir, *self.data_dir.rglob("*")]):
            info = path.lstat()
            digest.update(f"{path}:{info.st_mode}:{info.st_uid}:{info.st_mtime_ns}".encode())
            if path.is_file():
                digest.update(path.read_bytes())
        return digest.hexdigest()

    def restore_data(self) -> None:
        """After the outside control run: put the data folder back as it was."""
        (self.data_dir / "planted.txt").unlink(missing_ok=True)
        target = self.data_dir / "scan-0.png"
        if not target.exists():
            target.write_bytes(b"\x89PNG pixels of a patient")
        os.chmod(target, 0o644)
        os.utime(target)
        self.reset_shm()
        self.hits.clear()

    def config(self, marker: str) -> dict[str, Any]:
        start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
        return {
            "tcp_port": self.tcp_port,
            "udp_port": self.udp_port,
            "unix_path": self.unix_path,
            "unix_dgram_path": self.unix_dgram_path,
            "unix_abstract": self.abstract,
            "shm_key": self.shm_key,
            "msg_key": self.msg_key,
            "mqueue": self.mqueue,
            "secret_file": str(self.hospital_dir / "ledger" / "signing.key"),
            "hospital_dir": str(self.hospital_dir),
            "other_cache_file": str(self.hospital_dir / "cache" / "other-run" / "decoded.npz"),
            "data_dir": str(self.data_dir),
            "data_file": "scan-0.png",
            "node_pid": os.getpid(),
            "node_start": start,
            "marker": marker,
            "processes_limit": CHECK_LIMITS.processes,
            "memory_limit_mb": CHECK_LIMITS.memory_mb,
            f"disk_limit_mb:{SCRATCH}": CHECK_LIMITS.scratch_mb,
            f"disk_limit_mb:{SHM}": CHECK_LIMITS.shm_mb,
            f"disk_limit_mb:{CACHE}": CHECK_LIMITS.cache_mb,
        }

    def __exit__(self, *exc: object) -> None:
        for close in self._closers:
            with contextlib.suppress(OSError):
                close()
        _libc.shmctl(self.shm_id, IPC_RMID, None)
        _libc.msgctl(self.msg_id, IPC_RMID, None)
        if self.mq_fd >= 0:
            os.close(self.mq_fd)
        _libc.mq_unlink(self.mqueue.encode())


def probe_instruction() -> Any:
    """A train instruction as a server would send it (one small tensor)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedgate.flower_adapter import make_instruction

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))}),
                          "config": ConfigRecord({"server-round": 1})})  # fmt: skip
    return make_instruction(content, "train", dst_node_id=1)


def run_check(
    workdir: Path | None = None,
    landlock: bool = True,
    include_limits: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    say = progress or (lambda _: None)
    report = CheckReport(landlock=landlock)
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedgate-check-", dir=workdir)))
        os.chmod(root, 0o755)
        world = stack.enter_context(World(root))
        marker = f"fedgate-check-marker-{world.tag}"
        config = world.config(marker)
        say("outside the sandbox (the control)")
        outside = {}
        for attempt in escapes.ATTEMPTS:
            if attempt.outside:
                worked, detail = escapes.play(attempt, config)
                outside[attempt.name] = ("worked" if worked else "failed", detail)
                world.restore_data()
        before = world.data_state()
        spec = SandboxSpec(read_only=(), data_dir=world.data_dir, cache_seed=world.cache_dir, limits=CHECK_LIMITS,
                           landlock=landlock, masks=(world.hospital_dir,))  # fmt: skip
        log_path = root / "sandbox.log"
        worker = SandboxWorker(spec, AppRef("fedgate.sandbox.escapes:app", ()), log_path)
        stack.callback(worker.stop)
        say("starting the sandbox")
        report.isolation = worker.start()
        inside = _play_inside(worker, config, [a.name for a in escapes.ATTEMPTS])
        leftovers = procs.descendants(worker.worker_pid) if worker.worker_pid else []
        host_checks = {
            "tcp-loopback": "tcp" in world.hits,
            "udp-loopback": "udp" in world.hits,
            "unix-pathname": "unix" in world.hits,
            "socketpair-sendto": "unix-dgram" in world.hits,
            "unix-abstract": "unix-abstract" in world.hits,
            "sysv-shm": world.shm_bytes().strip(b"\0") != b"",
            "write-data": world.data_state() != before,
            "daemon": bool(leftovers),
            "cache-plants-on-host": _unsafe_files(world.cache_dir),
            "stdout-marker": marker not in log_path.read_text(errors="replace"),
        }
        for attempt in escapes.ATTEMPTS:
            escaped, detail = inside.get(attempt.name, (NO_ANSWER, "no answer"))
            if host_checks.get(attempt.name):
                escaped, detail = True, f"seen from the host: {detail}"
            if attempt.name == "daemon" and not leftovers:
                detail = "no process of the task was left (checked from the host)"
            if attempt.name == "stdout-marker" and not escaped:
                detail = "went to the task's log file, not to the node's output"
            out, out_detail = outside.get(attempt.name, ("not tried", ""))
            report.rows.append(_row(attempt, out, escaped, detail or out_detail))
        if include_limits:
            for attempt in escapes.LIMIT_ATTEMPTS:
                say(f"limits: {attempt.name}")
                if not worker.alive:
                    worker.start()
                limit_escaped, detail = _play_limit(worker, config, attempt)
                report.rows.append(_row(attempt, "not tried", limit_escaped, detail))
        root_pid = worker.proc.pid if worker.proc else None
        worker.stop()
        if root_pid is not None:
            after = procs.descendants(root_pid)
            report.rows.append(
                CheckRow("nothing-outlives", "processes", "any process left after the sandbox stopped", "not tried",
                         "ESCAPED" if after else "held", f"left: {after}" if after else "none (checked from the host)")
            )  # fmt: skip
    return report


def _unsafe_files(folder: Path) -> bool:
    """Anything in the host copy of the cache that the sandbox chose the kind or mode of."""
    for path in folder.rglob("*") if folder.is_dir() else []:
        info = path.lstat()
        if path.is_symlink() or (info.st_mode & 0o7022) or not (path.is_file() or path.is_dir()):
            return True
    return False


def _row(attempt: escapes.Attempt, outside: str, escaped: bool | None, detail: str) -> CheckRow:
    inside = "no answer" if escaped is NO_ANSWER else "ESCAPED" if escaped else "held"
    return CheckRow(attempt.name, attempt.group, attempt.about, outside, inside, detail)


def _play_inside(worker: SandboxWorker, config: dict[str, Any], names: list[str]) -> dict[str, tuple[bool | None, str]]:
    from flwr.app import Context, RecordDict

    from fedgate.flower_adapter import context_to_bytes, message_from_bytes, message_to_bytes

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                      run_config={**config, "attempts": ",".join(names)})  # fmt: skip
    outcome = worker.run(message_to_bytes(probe_instruction()), context_to_bytes(context))
    if not outcome.ok or outcome.reply is None:  # no answer proves nothing: not "held"
        return {
            name: (NO_ANSWER, f"the task ended without an answer: {outcome.rule} {outcome.error}") for name in names
        }
    content = message_from_bytes(outcome.reply).content
    escaped = content.metric_records["escapes"]
    details = content.config_records["details"]
    return {name: (bool(escaped.get(name, 1)), str(details.get(name, ""))) for name in names}


def _play_limit(worker: SandboxWorker, config: dict[str, Any], attempt: escapes.Attempt) -> tuple[bool | None, str]:
    """A limit holds when the attempt says so, or when the sandbox was stopped for it."""
    answers = _play_inside(worker, config, [attempt.name])
    escaped, detail = answers[attempt.name]
    if escaped is NO_ANSWER and "sandbox-limit" in detail:
        return False, f"the sandbox was stopped: {detail.split('sandbox-limit', 1)[1].strip()}"
    return escaped, detail
