"""The reference app's networks. They live in fedgate's model zoo (`fedgate.training.zoo`), so
that a hospital in trusted mode builds the same network from its own code; the app keeps its
short names "cnn" and "resnet18" and also accepts the zoo's names."""

from __future__ import annotations

from torch import nn

from fedgate.training.zoo import ZOO, BasicBlock, ResNet18, SmallCNN

__all__ = ["APP_NAMES", "BasicBlock", "ResNet18", "SmallCNN", "build_model"]

APP_NAMES = {"cnn": "small-cnn", "resnet18": "resnet18-gn"}


def build_model(name: str, n_classes: int, image_size: int = 64) -> nn.Module:
    zoo_name = APP_NAMES.get(name, name)
    if zoo_name not in ZOO:
        choices = ", ".join(repr(n) for n in [*APP_NAMES, *ZOO])
        raise ValueError(f"unknown model {name!r}: choose one of {choices}")
    return ZOO[zoo_name].build(n_classes, image_size)
