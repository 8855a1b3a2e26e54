"""The research team's half in trusted mode: Flower's stock FedAvg, sending a recipe instead
of running code at the hospitals. The recipe (a model of fedgate's zoo and DP-SGD settings)
rides in the train and evaluate config records as flat `recipe.*` keys; each hospital checks it
against its own policy and trains with its own code. Centralised evaluation on the held-out
global test split after every round, as in `server_app`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedgate.data import ShareSpec, global_test_dataset
from fedgate.training import Recipe, build_model, recipe_to_config
from fedgate.training.client import evaluate_model
from fedgate_medical.models import APP_NAMES
from fedgate_medical.task import AppConfig

app = ServerApp()


def recipe_from(context: Context, cfg: AppConfig) -> Recipe:
    """The run config's DP-SGD settings (`noise-multiplier`, `max-grad-norm`) and the app's
    training settings as a recipe."""
    run = dict(context.run_config)
    return Recipe(
        model=APP_NAMES.get(cfg.model, cfg.model),
        image_size=cfg.image_size,
        classes=2,
        optimizer=str(run.get("optimizer", "adam")),
        lr=cfg.lr,
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        max_grad_norm=float(run.get("max-grad-norm", 1.0)),
        noise_multiplier=float(run.get("noise-multiplier", 2.0)),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(dict(context.run_config))
    recipe = recipe_from(context, cfg)
    n_hospitals = cfg.num_hospitals or len(list(grid.get_node_ids()))
    share = ShareSpec(cfg.dataset, cfg.image_size, cfg.subset, cfg.partition, cfg.alpha, cfg.test_fraction, cfg.seed)
    test_set = global_test_dataset(share, n_hospitals)
    torch.manual_seed(cfg.seed)  # the same initial model as the gated reference app
    model = build_model(recipe.model, recipe.classes, recipe.image_size)
    initial = {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        weights = {key: np.asarray(array.numpy()) for key, array in arrays.items()}
        loss, accuracy, auc = evaluate_model(recipe, weights, test_set)
        if cfg.metrics_file:
            line = {"round": server_round, "loss": loss, "accuracy": accuracy, "auc": auc, "time": time.time()}
            with Path(cfg.metrics_file).open("a") as handle:
                handle.write(json.dumps(line) + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy, "auc": auc})

    config = ConfigRecord(recipe_to_config(recipe))
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n_hospitals,
        min_evaluate_nodes=n_hospitals,
        min_available_nodes=n_hospitals,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({key: Array(value) for key, value in initial.items()}),
        num_rounds=cfg.num_server_rounds,
        train_config=config,
        evaluate_config=config,
        evaluate_fn=central_evaluate,
    )
