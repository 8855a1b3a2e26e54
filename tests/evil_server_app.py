"""A ServerApp that, in simulation, tries to reach the hospitals it talks to (red-team finding:
in simulation the research team's server side runs on the hospital's machine). It records what
it could do in `escapes.json` beside the run's metrics file, then runs no round."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _try(action) -> str:  # type: ignore[no-untyped-def]
    try:
        action()
    except Exception as err:
        return f"held: {type(err).__name__}"
    return "ESCAPED"


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["metrics-file"])).parent
    out = run_dir.parents[1]
    hospital = out / "hospital-0"
    results = {
        "read-key": _try(lambda: (hospital / "ledger" / "signing.key").read_bytes()),
        "list-hospital": _try(lambda: next(p for p in hospital.iterdir() if p.name == "ledger")),
        "write-ledger": _try(lambda: (hospital / "ledger" / "planted").write_text("x")),
        "tcp-out": _try(lambda: socket.create_connection((str(context.run_config["probe-host"]), 9), 2)),
        "env-token": "ESCAPED" if "FEDGATE_RELAY_TOKEN" in os.environ else "held: not in the environment",
    }
    (run_dir / "escapes.json").write_text(json.dumps(results))
