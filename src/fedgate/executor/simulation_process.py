"""`python -m fedgate.executor.simulation_process SPEC.json`: the research team's side of a
simulation — Flower's engine, the ServerApp and Ray's actors — in a process of its own. Its
ClientApp is the relay to the hospitals in the parent `fedgate run` process.

Exit status: 0 done, 2 the ServerApp (or its config) is unusable (the message is on stderr),
1 anything else."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import json
import logging
import sys
from pathlib import Path

from fedgate.errors import FedgateError
from fedgate.executor.loading import load_server_app
from fedgate.executor.relay import RelayClientApp
from fedgate.flower_adapter import run_simulation


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    sys.path[:0] = [str(p) for p in spec.get("paths", [])]
    token = os.environ.pop("FEDGATE_RELAY_TOKEN")  # before any of the research team's code is imported
    verbose = bool(spec["verbose"])
    level = logging.DEBUG if verbose else logging.WARNING
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)
    try:
        server_app = load_server_app(spec["server_app"])
    except FedgateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    client_app = RelayClientApp(
        spec["relay"], token, spec["run_config"], int(spec["max_frame"]), inner=spec.get("inner")
    )
    try:
        run_simulation(
            client_app=client_app,
            server_app=server_app,
            hospitals=int(spec["hospitals"]),
            run_id=int(spec["run_id"]),
            run_config=spec["run_config"],
            ray_dir=spec["ray_dir"],
            verbose=verbose,
            actors=int(spec["actors"]),
        )
    except (FedgateError, ValueError) as err:  # the app's own data or config errors: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
