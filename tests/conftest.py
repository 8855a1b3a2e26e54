"""Shared helpers: Flower messages built the way the simulation engine builds them."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from model_fixtures import array_record, tiny_model

RUN_ID = 4242
NODE_ID = 17


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
