"""A federation in Flower's simulation engine with each hospital's gate running SecAgg+: the same
pieces `fedgate run` puts together (hospitals with their gates, ledgers and sandboxes in this
process; Flower's engine, Ray and the ServerApp in a child process; the relay between them),
with the SecAgg+ handler in each hospital. Used by the slow tests and `benchmarks/secagg_cost.py`
until the CLI's `--secagg` wiring lands."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgate.executor.hospital import Hospital, HospitalConfig, preload_for
from fedgate.executor.relay import RelayServer, hospital_name
from fedgate.flower_adapter import new_run_id
from fedgate.policy import Policy
from fedgate.sandbox.runner import AppRef
from fedgate.sandbox.spec import package_dir
from fedgate.secagg import SecAggPolicy
from fedgate.secagg.handler import handlers_for

HERE = Path(__file__).resolve().parent
APPS = HERE.parents[1] / "apps" / "medical"


@dataclass(frozen=True)
class SimulationResult:
    run_id: int
    returncode: int
    seconds: float
    log: str
    rounds: list[dict[str, Any]]  # the metrics file's lines (central evaluation per round, with a time)


def simulate(
    out: Path,
    hospitals: int,
    client_app: str,
    server_app: str,
    policy: Policy,
    secagg: SecAggPolicy | None,
    run_config: dict[str, Any],
    timeout_s: float = 900,
) -> SimulationResult:
    module = client_app.partition(":")[0]
    where = package_dir(module)
    app = AppRef(client_app, (where.parent,))
    run_id = new_run_id()
    run_dir = out / "runs" / str(run_id)
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    config = {**run_config, "num-hospitals": hospitals, "metrics-file": str(metrics)}
    members = {
        hospital_name(i): Hospital(
            HospitalConfig(
                name=hospital_name(i), folder=out / hospital_name(i), policy=policy, destination="simulation://serverapp",
                app=app, preload=preload_for(where), handlers=handlers_for(policy, secagg) if secagg else (),
                executor={"executor": "fedgate-simulation", "client_app": client_app},
            )
        )
        for i in range(hospitals)
    }  # fmt: skip
    token = secrets.token_hex(16)
    relay = RelayServer(out / ".relay" / "sock", token, members, policy.sandbox.max_frame_mb << 20).start()
    ray_dir = tempfile.mkdtemp(prefix="fg-ray-")
    spec = {"server_app": server_app, "hospitals": hospitals, "run_id": run_id, "run_config": config,
            "relay": str(relay.path), "max_frame": policy.sandbox.max_frame_mb << 20, "inner": None,
            "ray_dir": ray_dir, "verbose": False}  # fmt: skip
    (run_dir / "simulation.json").write_text(json.dumps(spec))
    paths = [str(HERE), str(APPS), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "FEDGATE_RELAY_TOKEN": token, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}  # fmt: skip
    started = time.monotonic()
    try:
        with (run_dir / "simulation.log").open("wb") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "fedgate.executor.simulation_process", str(run_dir / "simulation.json")],
                stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False,
            )  # fmt: skip
    finally:
        seconds = time.monotonic() - started
        relay.close()
        for hospital in members.values():
            hospital.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    text = (run_dir / "simulation.log").read_text(errors="replace")
    return SimulationResult(run_id, proc.returncode, seconds, text, lines)
