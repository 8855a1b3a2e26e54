"""A legacy-layout ClientApp (Flower's `NumPyClient`, as SecAgg+ users write them) on a small
numpy model, and the server side that drives it through fedgate's SecAgg+ workflow. Both run
where pytest may not be importable (the sandbox, the simulation's child process).

Run config: `fail-partitions` ("1,3"): those hospitals' ClientApps raise at fit (the gate refuses,
so they drop out at the masked stage); `update-scale`: the size of each hospital's update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

SHAPES = {"w": (100, 100), "b": (100,), "steps": (1,)}


def initial_model(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=SHAPES["w"]).astype(np.float32),
        np.zeros(SHAPES["b"], dtype=np.float32),
        np.array([3], dtype=np.int64),
    ]


def update_for(partition: int, server_round: int, shapes: list[tuple[int, ...]], scale: float) -> list[np.ndarray]:
    """Each hospital's own update: different per hospital and round, reproducible."""
    rng = np.random.default_rng([partition, server_round, 11])
    return [scale * (partition + 1) * rng.normal(size=shape) for shape in shapes]


class _Client(NumPyClient):
    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        partition = int(self.context.node_config["partition-id"])
        failing = str(self.context.run_config.get("fail-partitions", ""))
        if str(partition) in failing.split(","):
            raise RuntimeError(f"hospital {partition} fails on purpose")
        scale = float(self.context.run_config.get("update-scale", 0.01))
        server_round = int(config.get("server-round", 0))
        updates = update_for(partition, server_round, [p.shape for p in parameters], scale)
        out = [p + u.astype(p.dtype) if p.dtype.kind == "f" else p for p, u in zip(parameters, updates, strict=True)]
        return out, 100 * (partition + 1) + 7, {"train-loss": 0.25 + 0.1 * partition}


def _client_fn(context: Context) -> Any:
    return _Client(context).to_client()


app = ClientApp(client_fn=_client_fn)


def run_server(grid: Any, context: Context, rounds: int, num_shares: int, threshold: int) -> tuple[Any, Any]:
    """fedgate's SecAgg+ workflow around a stock legacy FedAvg; returns (final model, workflow)."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow

    from fedgate.secagg.workflow import GateSecAggPlusWorkflow

    n = len(list(grid.get_node_ids()))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(initial_model()),
        on_fit_config_fn=lambda rnd: {"server-round": rnd},
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    workflow = GateSecAggPlusWorkflow(num_shares, threshold)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    final = parameters_to_ndarrays(arrayrecord_to_parameters(legacy.state.array_records["parameters"], True))
    out = context.run_config.get("model-file")
    if out:
        np.savez(str(out), *final)
        Path(str(out) + ".json").write_text(json.dumps(workflow.rounds))
    return final, workflow
