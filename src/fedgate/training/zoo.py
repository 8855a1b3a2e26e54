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
from fedgate.training.catalogue import CATALOGUE, ModelSpec, model_spec
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
class ZooModel(ModelSpec):
    """A catalogue entry with its network builder."""

    build: Callable[[int, int], nn.Module]  # (n_classes, image_size) -> network


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small-cnn": lambda n_classes, image_size: SmallCNN(n_classes=n_classes, image_size=image_size),
    "resnet18-gn": lambda n_classes, image_size: ResNet18(n_classes=n_classes),
    "densenet121-gn": lambda n_classes, image_size: densenet121_gn(n_classes),
    "scatternet-linear": lambda n_classes, image_size: ScatterNetLinear(n_classes=n_classes, image_size=image_size),
}
assert set(_BUILDERS) == set(CATALOGUE), "every catalogue entry needs a builder, and only those"
ZOO: Mapping[str, ZooModel] = MappingProxyType(
    {name: ZooModel(**vars(spec), build=_BUILDERS[name]) for name, spec in CATALOGUE.items()}
)


def zoo_names() -> tuple[str, ...]:
    return tuple(ZOO)


def zoo_entry(name: str) -> ZooModel:
    model_spec(name)  # the catalogue's refusal for an unknown name
    return ZOO[name]


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


# No zoo network, trained or not, comes near this; a server's weights beyond it are refused before
# training (a finite weight of 1e38 overflows on one chosen image only: a membership test).
MAX_ABS_WEIGHT = 1e4


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
        if array.size and float(np.abs(array).max()) > MAX_ABS_WEIGHT:
            raise RecipeError(
                "manifest.range",
                f"tensor {key!r} holds a value of magnitude above {MAX_ABS_WEIGHT:g}: weights that large only serve "
                "to make one image's computation overflow",
                tensor=key,
            )
