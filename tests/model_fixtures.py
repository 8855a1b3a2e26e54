"""A tiny model as Flower arrays, for tests and for the test ServerApp (which runs where
pytest may not be importable)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


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
