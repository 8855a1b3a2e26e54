"""`fedgate run`: any Flower ClientApp/ServerApp pair in Flower's simulation engine, every
reply through the hospital's gate pipeline, results in `OUT/summary.json`."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fedgate.errors import FedgateError
from fedgate.executor.gated_client_app import GatedClientApp, hospital_name
from fedgate.executor.loading import load_client_app, load_server_app
from fedgate.executor.progress import METRICS_FILE, RoundPrinter
from fedgate.executor.summary import write_summary
from fedgate.policy import Policy

REFERENCE_CLIENT_APP = "fedgate_medical.client_app:app"
REFERENCE_SERVER_APP = "fedgate_medical.server_app:app"
SIMULATION_DESTINATION = "simulation://serverapp"


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


def _check(spec: RunSpec) -> None:
    if spec.hospitals < 1:
        raise FedgateError(f"--hospitals must be at least 1, got {spec.hospitals}")
    if spec.rounds < 1:
        raise FedgateError(f"--rounds must be at least 1, got {spec.rounds}")


def _ray_temp_dir(out_dir: Path) -> tuple[str, bool]:
    """Ray's session folder, inside the run folder when the path is short enough for the
    Unix sockets Ray puts there (107 bytes); else a fresh temporary folder we delete after."""
    candidate = out_dir.resolve() / "ray"
    if len(str(candidate)) <= 40:
        return str(candidate), False
    return tempfile.mkdtemp(prefix="fg-ray-"), True


def _quiet_flower(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)


def run_federation(spec: RunSpec, console: Console | None = None) -> dict[str, Any]:
    """Run the federation; return (and write) the summary."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    console = console or Console()
    _check(spec)
    client_app = load_client_app(spec.client_app)
    server_app = load_server_app(spec.server_app)
    out_dir = spec.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    hospital_dirs = [out_dir / hospital_name(i) for i in range(spec.hospitals)]
    for folder in hospital_dirs:
        folder.mkdir(exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)

    run_config: dict[str, bool | int | float | str] = {
        **spec.run_config,
        "num-server-rounds": spec.rounds,
        "num-hospitals": spec.hospitals,
        "metrics-file": str(metrics_path.resolve()),
    }
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.override_config = run_config
    run.primary_task_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    # Flower's Message constructor reads the sender's identity from this process-wide slot.
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)

    gated = GatedClientApp(client_app, spec.policy, out_dir, SIMULATION_DESTINATION, run_config)
    ray_dir, ray_dir_is_temp = _ray_temp_dir(out_dir)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(os.cpu_count() or 1, spec.hospitals)),
            "_temp_dir": ray_dir,
            "logging_level": logging.DEBUG if spec.verbose else logging.ERROR,
            "log_to_driver": spec.verbose,
        },
    }
    _quiet_flower(spec.verbose)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    console.print(
        f"[bold]fedgate[/] {spec.hospitals} hospitals x {spec.rounds} rounds · client app {spec.client_app} · "
        f"policy {spec.policy.hash[:12]} · out {out_dir}"
    )
    started = time.monotonic()
    try:
        with RoundPrinter(metrics_path, spec.rounds, console, started):
            _run_simulation(
                num_supernodes=spec.hospitals,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=gated,
                server_app=server_app,
                backend_config=backend_config,  # type: ignore[arg-type]
                run=run,
                server_app_context=server_context,
                verbose_logging=spec.verbose,
            )
    finally:
        _shutdown_ray()
        if ray_dir_is_temp:
            shutil.rmtree(ray_dir, ignore_errors=True)
    seconds = time.monotonic() - started
    return write_summary(out_dir, run_id, spec.hospitals, spec.rounds, seconds, hospital_dirs, spec.policy.hash)


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
