"""The research team's half of the reference app: FedAvg with a centralised evaluation on
the held-out global test split after every round, and the hospitals' own evaluation on their
validation splits every `evaluate-every` rounds and after the last."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedgate_medical.task import AppConfig, evaluate, global_test_data, new_model

app = ServerApp()


class FedAvgEvaluatingEvery(FedAvg):
    """FedAvg whose federated evaluation runs every `every` rounds and after the last one
    (`every` 0: after the last only)."""

    def __init__(self, num_rounds: int, every: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.num_rounds = num_rounds
        self.every = every

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round != self.num_rounds and not (self.every > 0 and server_round % self.every == 0):
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(dict(context.run_config))
    n_hospitals = cfg.num_hospitals or len(list(grid.get_node_ids()))
    test_set = global_test_data(cfg, n_hospitals)
    model = new_model(cfg)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy, auc = evaluate(model, test_set)
        if cfg.metrics_file:
            line = {"round": server_round, "loss": loss, "accuracy": accuracy, "auc": auc, "time": time.time()}
            with Path(cfg.metrics_file).open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy, "auc": auc})

    strategy = FedAvgEvaluatingEvery(
        cfg.num_server_rounds,
        cfg.evaluate_every,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n_hospitals,
        min_evaluate_nodes=n_hospitals,
        min_available_nodes=n_hospitals,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.num_server_rounds,
        train_config=ConfigRecord({"lr": cfg.lr}),
        evaluate_fn=central_evaluate,
    )
