"""`fedgate run` / `fedgate demo`: any Flower ClientApp/ServerApp pair in Flower's simulation
engine, each hospital's ClientApp in a sandbox of its own, every reply through its gate.

This process holds the hospitals (gates, ledgers, sandboxes) and nothing of the research
team's code. Flower's engine, the ServerApp and Ray run in a child process (`simulation_process`)
whose ClientApp is a relay to the hospitals here. Ctrl-C or SIGTERM stops that child, every
sandbox and every process either started, within seconds; the ledgers stay whole."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedgate.errors import FedgateError
from fedgate.executor.audit_data import simulated_data
from fedgate.executor.cores import CoreScheduler
from fedgate.executor.hospital import Hospital, HospitalConfig, preload_for
from fedgate.executor.processes import Started, become_subreaper, signals_interrupt
from fedgate.executor.progress import METRICS_FILE, RoundPrinter
from fedgate.executor.relay import RelayServer, hospital_name
from fedgate.executor.summary import write_summary
from fedgate.executor.trusted import TRUSTED_APP, TRUSTED_PRELOAD, TrustedTraining, simulated_hospital_data
from fedgate.flower_adapter import new_run_id
from fedgate.policy import Policy
from fedgate.sandbox.bwrap import sandbox_argv
from fedgate.sandbox.runner import AppRef, sandbox_env
from fedgate.sandbox.spec import Limits, SandboxError, SandboxSpec, package_dir, sandbox_uid
from fedgate.secagg.handler import handlers_for

REFERENCE_CLIENT_APP = "fedgate_medical.client_app:app"
REFERENCE_SERVER_APP = "fedgate_medical.server_app:app"
SIMULATION_DESTINATION = "simulation://serverapp"
RUNS_DIR = "runs"
PROCESS_STOP_S = 10.0


@dataclass(frozen=True)
class RunSpec:
    client_app: str
    server_app: str
    hospitals: int
    rounds: int
    out_dir: Path
    policy: Policy
    run_config: Mapping[str, bool | int | float | str] = field(default_factory=dict)
    verbose: bool = False
    isolation: str = "sandbox"  # "sandbox" | "none" (--no-isolation)
    data_dir: Path | None = None
    landlock: bool = True


# Each actor is a process with Ray and Flower loaded (~4 s of CPU to start on this machine): past
# this many hospitals, some of a round's tasks reach the core scheduler in Flower's order.
RELAY_ACTORS_MAX = 16


def check_out_dir(out_dir: Path) -> str:
    """A usable run folder, or a one-line error. Returns "new" (empty or absent) or
    "continuing" (it holds fedgate hospitals or runs: the same hospitals take part again)."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise FedgateError(f"--out {out_dir}: {parent} is a file, not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return "new"
    if (out_dir / RUNS_DIR).is_dir() or any(out_dir.glob("hospital-*")):
        return "continuing"
    raise FedgateError(f"--out {out_dir} is a folder with other things in it; choose a new or empty folder")


def app_config_keys(module: str) -> set[str] | None:
    """The run-config keys an app declares ([tool.flwr.app.config] in the pyproject.toml
    beside its package), found without importing it; None when it has none to check against."""
    try:
        where = package_dir(module)
    except SandboxError:
        return None
    for folder in [where, *where.parents][:4]:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
            except (KeyError, tomllib.TOMLDecodeError, OSError):
                return None
            return set(config)
    return None


def check_config_keys(modules: list[str], config: Mapping[str, object]) -> None:
    """-c keys must be ones the apps declare (both halves read the same run config); an app
    without a [tool.flwr.app.config] table gives nothing to check against."""
    declared = [app_config_keys(module) for module in modules]
    if any(keys is None for keys in declared):
        return
    known = set().union(*(keys for keys in declared if keys is not None))
    unknown = sorted(set(config) - known)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
        raise FedgateError(f"unknown -c key(s): {', '.join(hints)}; the apps declare: {', '.join(sorted(known))}")


def check_config_paths(config: Mapping[str, object], data_dir: Path | None) -> None:
    """A -c value naming a host file or folder (`npz:/data/scans.npz`, `/srv/dicom`) that the
    sandboxes cannot see is a one-line error, not a confusing "does not exist" from inside."""
    for key, value in config.items():
        if not isinstance(value, str):
            continue
        candidate = Path(value.split(":", 1)[1] if ":" in value and not value.startswith("/") else value)
        if not candidate.is_absolute() or not candidate.exists():
            continue
        inside = data_dir is not None and (candidate == data_dir or data_dir in candidate.resolve().parents)
        if not inside:
            folder = candidate if candidate.is_dir() else candidate.parent
            raise FedgateError(
                f"-c {key}={value} names a path on this machine that the sandboxes cannot see: "
                f"pass --data {folder} (bound read-only into them)"
            )


def _app_ref(reference: str) -> tuple[AppRef, Path]:
    """The app to sandbox, and where its own sources are (for `preload_for`)."""
    module = reference.partition(":")[0]
    if not module or ":" not in reference:
        raise FedgateError(f"client app {reference!r} must look like MODULE:ATTR, e.g. {REFERENCE_CLIENT_APP}")
    try:
        where = package_dir(module)
    except SandboxError as err:
        raise FedgateError(f"client app {reference!r}: {err}") from err
    return AppRef(reference, (where.parent,)), where


def trusted_handlers(spec: RunSpec, index: int) -> tuple[TrustedTraining, ...]:
    if not spec.policy.training.allows_trusted:
        return ()
    data = simulated_hospital_data(spec.policy, spec.run_config, index, spec.hospitals)
    return (TrustedTraining(spec.policy, data),)


def run_federation(spec: RunSpec, console: Console | None = None) -> dict[str, Any]:
    """Run the federation; return (and write) the summary."""
    console = console or Console()
    if spec.hospitals < 1:
        raise FedgateError(f"--hospitals must be at least 1, got {spec.hospitals}")
    if spec.rounds < 1:
        raise FedgateError(f"--rounds must be at least 1, got {spec.rounds}")
    if spec.policy.secagg.enabled and spec.isolation == "none":
        raise FedgateError("SecAgg+ needs the sandbox: with --no-isolation the ClientApp would get its messages")
    trusted_only = spec.policy.training.mode == "trusted"
    if trusted_only and spec.isolation != "sandbox":
        raise FedgateError("trusted mode runs fedgate's own trainer in each hospital's sandbox: drop --no-isolation")
    if spec.policy.training.allows_trusted and spec.policy.secagg.enabled:
        raise FedgateError("trusted training with SecAgg+ is not supported yet: choose one ([training] or [secagg])")
    out_dir = spec.out_dir.resolve()
    mode = check_out_dir(out_dir)
    if trusted_only:  # no research-team ClientApp at all: the hospitals run fedgate.training.client
        app, preload, client_label = TRUSTED_APP, TRUSTED_PRELOAD, "none (trusted mode: fedgate's own DP-SGD trainer)"
        check_config_keys([spec.server_app.partition(":")[0]], spec.run_config)
    else:
        app, sources = _app_ref(spec.client_app)
        preload, client_label = preload_for(sources), spec.client_app
        check_config_keys([spec.client_app.partition(":")[0], spec.server_app.partition(":")[0]], spec.run_config)
    check_config_paths(spec.run_config, spec.data_dir)
    run_id = new_run_id()
    run_dir = out_dir / RUNS_DIR / str(run_id)
    run_dir.mkdir(parents=True)
    metrics_path = run_dir / METRICS_FILE
    run_config: dict[str, bool | int | float | str] = {
        **spec.run_config, "num-server-rounds": spec.rounds, "num-hospitals": spec.hospitals,
        "metrics-file": str(metrics_path),
    }  # fmt: skip
    if mode == "continuing":
        console.print(f"[yellow]{out_dir} holds earlier runs: continuing with the same hospitals[/] (their budgets, "
                      f"halts and pinned models carry over); this run's files: {run_dir}")  # fmt: skip
    isolation = "[green]sandboxed[/]" if spec.isolation == "sandbox" else "[bold red]NOT ISOLATED (--no-isolation)[/]"
    console.print(
        f"[bold]fedgate[/] {spec.hospitals} hospitals x {spec.rounds} rounds · client app {client_label} "
        f"({isolation}) · policy {spec.policy.hash[:12]} · run {run_id} · out {out_dir}"
    )
    become_subreaper()
    started_processes = Started()
    hospitals: dict[str, Hospital] = {}
    relay: RelayServer | None = None
    ray_dir = tempfile.mkdtemp(prefix="fg-ray-")
    started = time.monotonic()
    interrupted = False
    cores = CoreScheduler(os.cpu_count() or 1) if spec.isolation == "sandbox" else None
    try:
        with signals_interrupt():
            for index in range(spec.hospitals):
                name = hospital_name(index)
                hospitals[name] = Hospital(
                    HospitalConfig(
                        name=name, folder=out_dir / name, policy=spec.policy, destination=SIMULATION_DESTINATION,
                        data_dir=spec.data_dir, app=app, isolation=spec.isolation, landlock=spec.landlock,
                        preload=preload, masks=(out_dir,),
                        data=simulated_data(spec.policy, spec.run_config, index, spec.hospitals),
                        handlers=(*handlers_for(spec.policy, spec.policy.secagg), *trusted_handlers(spec, index)),
                        executor={"executor": "fedgate-simulation", "client_app": client_label}, cores=cores,
                    )
                )  # fmt: skip
            if spec.isolation == "sandbox":
                console.print("[dim]starting the sandboxes…[/]")
                for hospital in hospitals.values():
                    hospital.warm_up(run_id)

            def check_app() -> None:
                problem = hospitals[hospital_name(0)].check_app(run_id) if spec.isolation == "sandbox" else ""
                if problem:
                    raise FedgateError(f"the client app {client_label} does not load in the sandbox: {problem}")

            token = secrets.token_hex(16)
            relay = RelayServer(out_dir / ".relay" / "sock", token, hospitals, spec.policy.sandbox.max_frame_mb << 20)
            returncode = _simulate(spec, run_id, run_config, run_dir, relay, token, ray_dir, console, started,
                                   check_app)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        console.print("[bold yellow]interrupted[/]: stopping the simulation and every sandbox…")
    finally:
        left = _shut_down(relay, hospitals, started_processes)
        shutil.rmtree(ray_dir, ignore_errors=True)
        if interrupted:
            console.print(
                f"stopped in {time.monotonic() - started:.1f} s; "
                + (f"[bold red]processes left: {left}[/]" if left else "no process left; the ledgers are whole")
            )
    if interrupted:
        raise KeyboardInterrupt
    if returncode == 2:
        raise FedgateError(_tail(run_dir / "simulation.log") or "the ServerApp could not be loaded")
    if returncode != 0:
        raise FedgateError(f"the simulation failed ({returncode}); see {run_dir / 'simulation.log'}")
    seconds = time.monotonic() - started
    return write_summary(out_dir, run_dir, run_id, spec.hospitals, spec.rounds, seconds, spec.policy.hash,
                         spec.policy.training.mode)  # fmt: skip


def _simulate(
    spec: RunSpec,
    run_id: int,
    run_config: dict[str, bool | int | float | str],
    run_dir: Path,
    relay: RelayServer,
    token: str,
    ray_dir: str,
    console: Console,
    started: float,
    check_app: Callable[[], None],
) -> int:
    """Flower's engine starts (Ray, the ServerApp) while the hospitals' sandboxes start; the
    relay serves its actors only once the ClientApp is known to load (until then they wait in
    the socket's backlog), so no task reaches a gate before that."""
    sim_spec = {
        "server_app": spec.server_app,
        "hospitals": spec.hospitals,
        "run_id": run_id,
        "run_config": run_config,
        "relay": str(relay.path),
        "max_frame": spec.policy.sandbox.max_frame_mb << 20,
        "inner": spec.client_app if spec.isolation == "none" else None,
        "ray_dir": ray_dir,
        "verbose": spec.verbose,
        # Sandboxed, an actor only relays bytes and the hospitals take turns for the cores
        # (executor/cores.py): one per hospital, up to RELAY_ACTORS_MAX. Unsandboxed, the actors
        # run the ClientApps: one per core.
        "actors": min(spec.hospitals, RELAY_ACTORS_MAX if spec.isolation == "sandbox" else os.cpu_count() or 1),
    }
    sandbox, argv, env = _server_side(spec, run_dir, relay, sim_spec, token)
    with (run_dir / "simulation.log").open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=None if spec.verbose else log,
            stderr=None if spec.verbose else log,
            env=env,
            pass_fds=sandbox,
            start_new_session=True,  # Ctrl-C reaches this process, which stops that one cleanly
        )
        for fd in sandbox:
            os.close(fd)
        check_app()
        relay.start()
        with RoundPrinter(run_dir / METRICS_FILE, spec.rounds, console, started):
            return proc.wait()


def _server_side(
    spec: RunSpec, run_dir: Path, relay: RelayServer, sim_spec: dict[str, Any], token: str
) -> tuple[tuple[int, ...], list[str], dict[str, str] | None]:
    """The research team's server side (Flower's engine, the ServerApp, Ray) in a sandbox of
    its own: a network namespace with only loopback (Ray's ports are unreachable from outside),
    the hospitals' folders hidden, its own unprivileged uid, writes only to this run's folder
    and the relay's. It keeps sockets (Ray needs them), so no seccomp filter."""
    out_dir = run_dir.parents[1]
    apps = [package_dir(spec.server_app.partition(":")[0])]
    if spec.isolation == "none":
        apps.append(package_dir(spec.client_app.partition(":")[0]))
    outside_ray_dir = sim_spec["ray_dir"]  # for the unsandboxed fallback only
    sim_spec = {**sim_spec, "paths": [str(p.parent) for p in apps], "ray_dir": "/tmp/ray"}
    spec_path = run_dir / "simulation.json"
    spec_path.write_text(json.dumps(sim_spec, indent=2))
    command = [sys.executable, "-m", "fedgate.executor.simulation_process", str(spec_path)]
    host_uid = sandbox_uid(f"server:{out_dir}")
    limits = Limits(memory_mb=1 << 20, processes=1 << 16, cpu_seconds=1 << 30, scratch_mb=4096, shm_mb=4096,
                    cache_mb=1, file_size_mb=1 << 16, open_files=1 << 16, timeout_s=1e9)  # fmt: skip
    data = (spec.data_dir,) if spec.data_dir is not None else ()
    server = SandboxSpec(read_only=(*apps, *data), cache=False, masks=(out_dir,), limits=limits,
                         writable=(run_dir, relay.path.parent), seccomp=False, host_uid=host_uid)  # fmt: skip
    env = {**sandbox_env(), "FEDGATE_RELAY_TOKEN": token, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           "FEDGATE_CACHE": "/tmp/cache"}  # fmt: skip
    try:
        argv = sandbox_argv(server, command, env, -1, os.geteuid() == 0)
    except SandboxError as err:
        Console(stderr=True).print(f"[bold red]the ServerApp runs unsandboxed: {err}[/]")
        plain = {**os.environ, "FEDGATE_RELAY_TOKEN": token, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        spec_path.write_text(json.dumps({**sim_spec, "ray_dir": outside_ray_dir}, indent=2))
        return (), command, plain
    if os.geteuid() == 0:
        for path in (run_dir, relay.path.parent, relay.path):
            os.chown(path, host_uid, host_uid)
    return (), argv, None


def _shut_down(relay: RelayServer | None, hospitals: Mapping[str, Hospital], started: Started) -> list[int]:
    """Stop the simulation's processes first (no new task arrives), then each hospital."""
    left = started.stop(timeout_s=PROCESS_STOP_S / 2)
    if relay is not None:
        relay.close()
    for hospital in hospitals.values():
        hospital.close()
    return left + started.stop(timeout_s=PROCESS_STOP_S / 2)


def _tail(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else ""
