"""Shared helpers: Flower messages built the way the simulation engine builds them."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242
NODE_ID = 17


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv.bias": np.zeros(4, dtype=np.float32),
        "fc.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "steps": np.array([3], dtype=np.int64),
    }


def array_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in tensors.items()})


def instruction(
    message_type: str = "train", server_round: int = 1, tensors: dict[str, np.ndarray] | None = None
) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, 1
    content = RecordDict(
        {"arrays": array_record(tensors or tiny_model()), "config": ConfigRecord({"server-round": server_round})}
    )
    message = Message(content, dst_node_id=NODE_ID, message_type=message_type)
    message.metadata.__dict__["_message_id"] = message.object_id  # as the Grid does on push
    return message


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, 1
    yield
