"""`fedgate demo --deploy`: a whole federation as separate processes on loopback.

One `flower-superlink` (TLS with a CA generated into the run folder, SuperNode
authentication on), and per hospital a stock `flower-supernode --isolation process` (its
authentication key registered with `flwr supernode register`) with a `fedgate node` beside
it (or, for the overhead baseline, Flower's own `flower-superexec`). The reference app is
submitted with `flwr run`. Every process started is stopped at the end, on Ctrl-C and on
failure."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from rich.console import Console

from fedgate.errors import FedgateError
from fedgate.executor.pki import make_node_auth_key, make_server_pki
from fedgate.executor.processes import Started, become_subreaper, signals_interrupt
from fedgate.executor.progress import METRICS_FILE, RoundPrinter
from fedgate.executor.simulation import check_out_dir
from fedgate.executor.summary import write_summary
from fedgate.gate.pipeline import LEDGER_DIR
from fedgate.ledger.store import Ledger
from fedgate.policy import load_policy
from fedgate.sandbox import procs

APP_DIR = Path(__file__).resolve().parents[3] / "apps" / "medical"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedgateError(f"{name} exited with {proc.returncode} before listening on {port}; see its log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise FedgateError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


class LocalFederation:
    def __init__(
        self,
        out_dir: Path,
        hospitals: int,
        policy: Path | None,
        gated: bool = True,
        link_port: int | None = None,
        hospital_policies: Mapping[int, Path] | None = None,
        hospital_data: Mapping[int, Path] | None = None,
    ) -> None:
        if hospitals < 1:
            raise FedgateError(f"--hospitals must be at least 1, got {hospitals}")
        self.out_dir = out_dir.resolve()
        self.hospitals = hospitals
        self.policy = policy.resolve() if policy else None
        self.hospital_policies = {i: p.resolve() for i, p in (hospital_policies or {}).items()}
        self.hospital_data = {i: p.resolve() for i, p in (hospital_data or {}).items()}
        self.gated = gated
        self.procs: list[subprocess.Popen[bytes]] = []
        self._log_files: list[IO[bytes]] = []
        self.logs = self.out_dir / "logs"
        self.bin = Path(sys.executable).parent
        self.link_port = link_port or free_port()
        self.cli_home = self.out_dir / "flwr-cli"
        become_subreaper()
        self._started = Started()

    @property
    def hospital_dirs(self) -> list[Path]:
        return [self.out_dir / f"hospital-{i}" for i in range(self.hospitals)]

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return {
            **os.environ,
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "OMP_NUM_THREADS": "1",
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def _start(self, name: str, cmd: list[str], flwr_home: Path) -> subprocess.Popen[bytes]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("wb")
        self._log_files.append(log)
        # Ctrl-C / SIGTERM wait until the child is in self.procs, so stop() always finds it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(flwr_home),
                start_new_session=True,
                cwd=self.out_dir,
            )
            self.procs.append(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return proc

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "flwr"), *args],
            capture_output=True,
            text=True,
            env=self._env(self.cli_home),
            timeout=timeout,
        )

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        pki = make_server_pki(self.out_dir / "pki")
        link = self._start(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                "--ssl-certfile",
                str(pki.server_cert),
                "--ssl-keyfile",
                str(pki.server_key),
                "--ssl-ca-certfile",
                str(pki.ca_cert),
                "--enable-supernode-auth",
                "--database",
                str(self.out_dir / "superlink.db"),
                "--port",
                str(self.link_port),
            ],
            self.out_dir / "superlink-home",
        )
        wait_for_port(self.link_port, link, "flower-superlink")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "fedgate-local"\n\n[superlink.fedgate-local]\n'
            f'address = "127.0.0.1:{self.link_port}"\nroot-certificates = "{pki.ca_cert}"\n'
        )
        for index, hospital_dir in enumerate(self.hospital_dirs):
            hospital_dir.mkdir(parents=True, exist_ok=True)
            private, public = make_node_auth_key(hospital_dir / "keys")
            registered = self._flwr("supernode", "register", str(public), "fedgate-local")
            if registered.returncode != 0:
                raise FedgateError(f"flwr supernode register failed: {registered.stdout}{registered.stderr}")
            secret = hospital_dir / "keys" / "superexec.secret"
            secret.write_bytes(secrets.token_bytes(32))
            secret.chmod(0o600)
            runtime_port = free_port()
            flwr_home = hospital_dir / "flwr-home"
            supernode = self._start(
                f"supernode-{index}",
                [
                    str(self.bin / "flower-supernode"),
                    "--superlink",
                    f"127.0.0.1:{self.link_port}",
                    "--root-certificates",
                    str(pki.ca_cert),
                    "--auth-supernode-private-key",
                    str(private),
                    "--isolation",
                    "process",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(runtime_port),
                    "--superexec-auth-secret-file",
                    str(secret),
                    "--node-config",
                    f"partition-id={index} num-partitions={self.hospitals}",
                ],
                flwr_home,
            )
            wait_for_port(runtime_port, supernode, f"flower-supernode {index}")
            runtime = f"127.0.0.1:{runtime_port}"
            if self.gated:
                data_dir = hospital_dir / "data"
                data_dir.mkdir(exist_ok=True)
                cmd = [
                    str(self.bin / "fedgate"),
                    "node",
                    "--runtime-api-address",
                    runtime,
                    "--insecure",
                    "--hospital-dir",
                    str(hospital_dir),
                    "--data-dir",
                    str(data_dir),
                    "--destination",
                    f"https://127.0.0.1:{self.link_port}",
                    "--superexec-auth-secret-file",
                    str(secret),
                ]
                hospital_policy = self.hospital_policies.get(index, self.policy)
                if hospital_policy:
                    cmd += ["--policy", str(hospital_policy)]
                if index in self.hospital_data:  # trusted mode: the images this simulated hospital trains on
                    cmd += ["--hospital-data", str(self.hospital_data[index])]
                if os.geteuid() == 0:
                    cmd.append("--allow-root")  # recorded in every ledger entry
                self._start(f"fedgate-node-{index}", cmd, flwr_home)
            else:
                self._start(
                    f"superexec-{index}",
                    [
                        str(self.bin / "flower-superexec"),
                        "--runtime-api-address",
                        runtime,
                        "--insecure",
                        "--superexec-auth-secret-file",
                        str(secret),
                    ],
                    flwr_home,
                )

    def run_app(
        self, run_config: Mapping[str, bool | int | float | str], app_dir: Path = APP_DIR, timeout_s: float = 1800
    ) -> str:
        """Submit a Flower app (default: the reference app) with `flwr run` and wait until it finishes."""
        if not app_dir.is_dir():
            raise FedgateError(f"the app folder {app_dir} is missing (the reference app ships in a fedgate checkout)")
        pairs = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        cmd = [str(self.bin / "flwr"), "run", str(app_dir), "fedgate-local", "--stream", "-c", pairs]
        proc = self._start("flwr-run", cmd, self.cli_home)  # tracked: stopped with the rest on Ctrl-C
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise FedgateError(f"flwr run did not finish within {timeout_s:.0f} s") from err
        log = (self.logs / "flwr-run.log").read_text(errors="replace")
        if returncode != 0:
            raise FedgateError(f"flwr run failed ({returncode}); see {self.logs / 'flwr-run.log'}")
        return log

    def stop(self) -> None:
        """Stop exactly the processes this federation started, and everything they started
        (the SuperLink's ServerApp processes, the nodes' sandboxes): SIGTERM to each one's
        process group, then SIGKILL to whatever is left of each tree, all within 10 s. No
        other process is looked at: a `less runs/demo/...` in another terminal is safe."""
        deadline = time.monotonic() + 4
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            procs.kill_tree(proc.pid, timeout_s=2.0)
        left = self._started.stop(grace_s=0.5, timeout_s=3.0)  # orphans re-parented to us (subreaper)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self.procs.clear()
        for log in self._log_files:
            log.close()
        self._log_files.clear()
        if left:
            raise FedgateError(f"processes {left} of the federation survived SIGKILL")


def run_local_deployment(
    out_dir: Path,
    hospitals: int,
    rounds: int,
    policy: Path | None,
    run_config: Mapping[str, bool | int | float | str],
    console: Console,
    gated: bool = True,
    app_dir: Path = APP_DIR,
    link_port: int | None = None,
    hospital_policies: Mapping[int, Path] | None = None,
    hospital_data: Mapping[int, Path] | None = None,
) -> dict[str, Any]:
    """Start the federation, run the app, stop everything; return (and write) the summary.
    `hospital_policies` gives some hospitals a policy of their own (tests: one refuses the FAB)."""
    out_dir = out_dir.resolve()
    if check_out_dir(out_dir) == "continuing":
        console.print(f"[yellow]{out_dir} holds earlier runs: continuing with the same hospitals[/]")
    run_dir = out_dir / "runs" / f"deploy-{time.time_ns()}"
    run_dir.mkdir(parents=True)
    metrics_path = run_dir / METRICS_FILE
    config = {**run_config, "num-server-rounds": rounds, "num-hospitals": hospitals, "metrics-file": str(metrics_path)}
    started = time.monotonic()
    console.print(
        f"[bold]fedgate --deploy[/] {hospitals} hospitals x {rounds} rounds: SuperLink (TLS, SuperNode "
        f"authentication), {hospitals} SuperNodes, {'fedgate nodes' if gated else 'Flower SuperExec'}; out {out_dir}"
    )
    with signals_interrupt():
        try:
            with LocalFederation(
                out_dir,
                hospitals,
                policy,
                gated=gated,
                link_port=link_port,
                hospital_policies=hospital_policies,
                hospital_data=hospital_data,
            ) as federation:
                console.print(f"federation up in {time.monotonic() - started:.1f} s; submitting the app with flwr run")
                with RoundPrinter(metrics_path, rounds, console, started):
                    federation.run_app(config, app_dir=app_dir)
        except KeyboardInterrupt:
            console.print(
                f"[bold yellow]interrupted[/]: every process of the federation was stopped "
                f"({time.monotonic() - started:.1f} s since start); the ledgers are whole"
            )
            raise
    run_id = _latest_run_id(out_dir / "hospital-0") if gated else 0
    final_dir = out_dir / "runs" / str(run_id)
    if run_id and not final_dir.exists():
        run_dir = run_dir.rename(final_dir)
    seconds = time.monotonic() - started
    effective = load_policy(policy)
    return write_summary(out_dir, run_dir, run_id, hospitals, rounds, seconds, effective.hash, effective.training.mode)


def _latest_run_id(hospital_dir: Path) -> int:
    if not (hospital_dir / LEDGER_DIR / "ledger.sqlite").is_file():
        return 0
    with Ledger(hospital_dir / LEDGER_DIR, create=False) as ledger:
        entries = ledger.entries()
    return int(entries[-1]["run_id"]) if entries else 0


def _toml(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
