"""Where the audit gets its models and images: the only imports of the reference app.

The zoo is moving to `fedgate.training.zoo` and the loaders to `fedgate.data`; switching the
audit over is a change to the two imports in this file and nothing else."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Images are uint8; the reference app trains on (x / 255 - 0.5) / 0.25 (fedgate_medical.task.to_tensors).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def build_model(name: str, n_classes: int, image_size: int) -> nn.Module:
    """A zoo model by name (`cnn` = the SmallCNN, `resnet18`)."""
    from fedgate_medical.models import build_model as zoo_build_model

    model: nn.Module = zoo_build_model(name, n_classes, image_size)
    return model


def load_images(spec: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (n, size, size), int64 labels (n,)) of a dataset spec (`br35h`, `npz:PATH`, ...)."""
    from fedgate_medical.data import load_dataset

    data = load_dataset(spec, size)
    return data.images, data.labels


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w) -> float (n, 1, h, w) normalised exactly as the reference app trains."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).sub(PIXEL_MEAN).div(PIXEL_STD).unsqueeze(1)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """float (n, 1, h, w) in model space -> uint8 (n, h, w), clipped to the valid range."""
    pixels = (images.detach().squeeze(1) * PIXEL_STD + PIXEL_MEAN) * 255.0
    return np.asarray(pixels.clamp(0.0, 255.0).round().to(torch.uint8).numpy())


def pixel_bounds() -> tuple[float, float]:
    """The model-space values of pixel 0 and pixel 255: the attack's box constraint."""
    return (0.0 - PIXEL_MEAN) / PIXEL_STD, (1.0 - PIXEL_MEAN) / PIXEL_STD
