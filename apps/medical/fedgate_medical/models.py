"""The two networks of the reference app. No torchvision: it forces another torch build."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Default model for 64x64 grayscale: four conv blocks with GroupNorm and a flat linear
    head (~63k parameters). Reached 93% on the held-out Br35H split in 4 centralised Adam
    epochs; the same blocks with a global-average-pool head plateaued near 77%. GroupNorm,
    not BatchNorm: running statistics would be buffers outside the update. Few parameters
    also matter for the gate: noise of a given sigma costs less the fewer coordinates it hits."""

    def __init__(self, n_classes: int = 2, width: int = 16, image_size: int = 64) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = [1, width, width * 2, width * 4, width * 4]
        for cin, cout in itertools.pairwise(channels):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        side = image_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(channels[-1] * side * side, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.GroupNorm(8, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout (~11M parameters) for benchmarks. GroupNorm instead of BatchNorm:
    BatchNorm's running statistics are buffers that move between hospitals outside the
    update, and Opacus cannot make BatchNorm private."""

    def __init__(self, n_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.GroupNorm(8, 64), nn.ReLU())
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def build_model(name: str, n_classes: int, image_size: int = 64) -> nn.Module:
    if name == "cnn":
        return SmallCNN(n_classes=n_classes, image_size=image_size)
    if name == "resnet18":
        return ResNet18(n_classes=n_classes)
    raise ValueError(f"unknown model {name!r}: choose 'cnn' or 'resnet18'")
