"""Synthetic images and a small network: the attack shown to work in seconds, not minutes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


def shapes(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """n uint8 images: a bright square or disc of random place, size and brightness on a dark ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(n):
        image = np.full((size, size), float(rng.integers(10, 60)))
        cy, cx, r = (int(v) for v in rng.integers([size // 4, size // 4, 2], [3 * size // 4, 3 * size // 4, 6]))
        value = float(rng.integers(150, 255))
        if i % 2:
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
        else:
            image[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = value
        out.append(image)
    return np.stack(out).astype(np.uint8)


def small_net(size: int = 16, seed: int = 0) -> nn.Module:
    """Two conv layers and a linear head: the shape of the zoo's nets at a fraction of the cost."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * (size // 2) ** 2, 2),
    )


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)
