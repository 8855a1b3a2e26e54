"""The hospital-side half of the reference app in Flower's legacy layout (a `NumPyClient`), which
Flower's SecAgg+ speaks: what a research team using SecAgg+ writes today, minus the
`secaggplus_mod` (the hospital's gate runs SecAgg+ itself; nothing of it reaches this code).
Training is the same as `client_app`'s."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from fedgate_medical.task import AppConfig, evaluate, hospital_data, new_model, train


def set_weights(model: torch.nn.Module, weights: list[np.ndarray]) -> None:
    """Legacy parameters are a list in the state dict's order (they carry no names)."""
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ValueError(f"the server sent {len(weights)} tensors for a model of {len(keys)}")
    model.load_state_dict({k: torch.from_numpy(np.array(w)) for k, w in zip(keys, weights, strict=True)})


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [value.detach().cpu().numpy() for value in model.state_dict().values()]


class HospitalClient(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.cfg = AppConfig.from_run_config(dict(context.run_config))
        self.hospital = int(context.node_config["partition-id"])
        self.n_hospitals = int(context.node_config["num-partitions"])

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        train_set, _ = hospital_data(self.cfg, self.hospital, self.n_hospitals)
        model = new_model(self.cfg)
        set_weights(model, parameters)
        server_round = int(config.get("server-round", 0))
        loss = train(
            model,
            train_set,
            epochs=self.cfg.local_epochs,
            lr=float(config.get("lr", self.cfg.lr)),
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed * 1000 + server_round * 100 + self.hospital,
        )
        return get_weights(model), len(train_set), {"train-loss": loss}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        _, val_set = hospital_data(self.cfg, self.hospital, self.n_hospitals)
        model = new_model(self.cfg)
        set_weights(model, parameters)
        loss, accuracy, _ = evaluate(model, val_set)
        return loss, len(val_set), {"eval-acc": accuracy}


def client_fn(context: Context) -> Any:
    return HospitalClient(context).to_client()


app = ClientApp(client_fn=client_fn)
