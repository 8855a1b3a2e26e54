"""fedgate's model zoo: the networks a trusted-mode recipe may name, and their manifests.

A recipe names a model; the instruction carries its weights. The hospital builds the network
from its own code (never the research team's) and requires the instruction's arrays to match
the network's manifest exactly (names, order, dtypes, shapes), so that the weights can only
mean what the zoo entry says."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from fedgate.gate.manifest import Manifest
from fedgate.training.errors import RecipeError
from fedgate.training.networks import BasicBlock, ResNet18, ScatterNetLinear, SmallCNN, densenet121_gn

__all__ = [
    "ZOO",
    "BasicBlock",
    "ResNet18",
    "ScatterNetLinear",
    "SmallCNN",
    "ZooModel",
    "build_model",
    "check_arrays",
    "manifest",
    "manifest_of_arrays",
    "zoo_entry",
    "zoo_names",
]


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry. `image_size_multiple` / `min_image_size`: input sizes the network accepts."""

    name: str
    summary: str
    min_image_size: int
    image_size_multiple: int
    build: Callable[[int, int], nn.Module]  # (n_classes, image_size) -> network

    def check_image_size(self, image_size: int) -> None:
        if image_size < self.min_image_size or image_size % self.image_size_multiple:
            raise RecipeError(
                "recipe.image-size",
                f"{self.name} takes images of at least {self.min_image_size} pixels, a multiple of "
                f"{self.image_size_multiple}; got {image_size}",
                key="recipe.image-size",
                value=image_size,
            )


ZOO: Mapping[str, ZooModel] = MappingProxyType(
    {
        "small-cnn": ZooModel(
            "small-cnn",
            "4 conv blocks with GroupNorm, flat linear head (63k parameters at 64x64)",
            16,
            16,
            lambda n_classes, image_size: SmallCNN(n_classes=n_classes, image_size=image_size),
        ),
        "resnet18-gn": ZooModel(
            "resnet18-gn",
            "ResNet-18 layout with GroupNorm (11M parameters)",
            8,
            8,
            lambda n_classes, image_size: ResNet18(n_classes=n_classes),
        ),
        "densenet121-gn": ZooModel(
            "densenet121-gn",
            "MONAI DenseNet121, 2-D, GroupNorm(8), out-of-place ReLU (7M parameters)",
            32,
            32,
            lambda n_classes, image_size: densenet121_gn(n_classes),
        ),
        "scatternet-linear": ZooModel(
            "scatternet-linear",
            "fixed wavelet scattering (J=2, L=8), GroupNorm, one linear layer (41k parameters at 64x64)",
            16,
            4,
            lambda n_classes, image_size: ScatterNetLinear(n_classes=n_classes, image_size=image_size),
        ),
    }
)


def zoo_names() -> tuple[str, ...]:
    return tuple(ZOO)


def zoo_entry(name: str) -> ZooModel:
    entry = ZOO.get(name)
    if entry is None:
        raise RecipeError(
            "recipe.model", f"{name!r} is not in fedgate's zoo ({', '.join(ZOO)})", key="recipe.model", value=name
        )
    return entry


def build_model(name: str, n_classes: int, image_size: int) -> nn.Module:
    """A fresh network (weights from torch's default initialisation)."""
    entry = zoo_entry(name)
    entry.check_image_size(image_size)
    if n_classes < 2:
        raise RecipeError("recipe.classes", f"need at least 2 classes, got {n_classes}", key="recipe.classes")
    return entry.build(n_classes, image_size)


@functools.lru_cache(maxsize=32)
def manifest(name: str, n_classes: int, image_size: int) -> Manifest:
    """The ordered tensor names, dtypes and shapes of the network's state dict: the gate's
    `Manifest`, so an instruction's arrays can be held to it exactly."""
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG alone
        network = build_model(name, n_classes, image_size)
    return manifest_of_arrays({key: value.detach().numpy() for key, value in network.state_dict().items()})


def manifest_of_arrays(arrays: Mapping[str, np.ndarray]) -> Manifest:
    return Manifest.of_arrays(arrays)


def check_arrays(name: str, n_classes: int, image_size: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse arrays that are not exactly the zoo network's tensors, or hold a non-finite value."""
    declared = manifest(name, n_classes, image_size)
    got = manifest_of_arrays(arrays)
    if got != declared:
        raise RecipeError(
            "manifest",
            f"the instruction's arrays are not those of {name} ({n_classes} classes, {image_size}px)",
            declared_hash=declared.hash,
            got_hash=got.hash,
            diff=declared.diff(got),
        )
    for key, array in arrays.items():
        if not np.isfinite(array).all():
            raise RecipeError("manifest.finite", f"tensor {key!r} holds a NaN or infinite value", tensor=key)
