"""The research team's half of the reference app on Flower's SecAgg+ path: a stock legacy FedAvg
inside `DefaultWorkflow`, with fedgate's SecAgg+ workflow (Flower's, with ChaCha20 masks and a
round that fails loudly) as its fit workflow, and the same central evaluation as `server_app`.
The server sees only the sum of the hospitals' gated updates; their ClientApp is
`client_app_legacy` (Flower's legacy layout, which SecAgg+ speaks).

Run config: `secagg-num-shares` (0: every hospital), `secagg-threshold` (0: a majority)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from fedgate.secagg.workflow import GateSecAggPlusWorkflow
from fedgate_medical.client_app_legacy import get_weights, set_weights
from fedgate_medical.task import AppConfig, evaluate, global_test_data, new_model

app = ServerApp()


def shares_and_threshold(run_config: dict[str, Any], hospitals: int) -> tuple[int, int]:
    shares = int(run_config.get("secagg-num-shares", 0)) or hospitals
    threshold = int(run_config.get("secagg-threshold", 0)) or hospitals // 2 + 1
    return shares, threshold


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(dict(context.run_config))
    n_hospitals = cfg.num_hospitals or len(list(grid.get_node_ids()))
    test_set = global_test_data(cfg, n_hospitals)
    model = new_model(cfg)

    def central_evaluate(
        server_round: int, weights: list[np.ndarray], _: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        set_weights(model, weights)
        loss, accuracy, auc = evaluate(model, test_set)
        if cfg.metrics_file:
            line = {"round": server_round, "loss": loss, "accuracy": accuracy, "auc": auc, "time": time.time()}
            with Path(cfg.metrics_file).open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        return loss, {"accuracy": accuracy, "auc": auc}

    with torch.no_grad():
        initial = get_weights(model)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,  # federated evaluation is not on the SecAgg+ path; the central one is
        min_fit_clients=n_hospitals,
        min_available_clients=n_hospitals,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=central_evaluate,
        on_fit_config_fn=lambda server_round: {"lr": cfg.lr, "server-round": server_round},
    )
    shares, threshold = shares_and_threshold(dict(context.run_config), n_hospitals)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.num_server_rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=GateSecAggPlusWorkflow(shares, threshold))(grid, legacy)
