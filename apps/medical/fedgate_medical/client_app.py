"""The hospital-side half of the reference app: train on the hospital's share, evaluate on
its local validation split. It knows nothing of fedgate: the gate wraps it from outside."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgate_medical.data import ImageSet
from fedgate_medical.task import AppConfig, evaluate, hospital_data, new_model, train

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[AppConfig, int, ImageSet, ImageSet, torch.nn.Module]:
    """This hospital's config, index, (train, validation) data and the received global model."""
    cfg = AppConfig.from_run_config(dict(context.run_config))
    hospital, n_hospitals = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    train_set, val_set = hospital_data(cfg, hospital, n_hospitals)
    model = new_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return cfg, hospital, train_set, val_set, model


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg, hospital, train_set, _, model = _setup(msg, context)
    config = msg.content.get("config", {})
    server_round = int(config.get("server-round", 0))
    loss = train(
        model,
        train_set,
        epochs=cfg.local_epochs,
        lr=float(config.get("lr", cfg.lr)),
        batch_size=cfg.batch_size,
        seed=cfg.seed * 1000 + server_round * 100 + hospital,
    )
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(train_set)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    _, _, _, val_set, model = _setup(msg, context)
    loss, accuracy, _ = evaluate(model, val_set)
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(val_set)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
