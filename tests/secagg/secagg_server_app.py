"""The test ServerApp for the simulation tests: fedgate's SecAgg+ workflow around a stock FedAvg on
`secagg_apps`' model; writes the final model to the run config's `model-file`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from secagg_apps import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    run_server(grid, context, int(config["num-server-rounds"]), int(config["secagg-num-shares"]),
               int(config["secagg-threshold"]))  # fmt: skip
