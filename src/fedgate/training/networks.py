"""The networks of fedgate's model zoo. No torchvision: it forces another torch build.

GroupNorm everywhere, never BatchNorm: BatchNorm's running statistics are buffers that would
leave the hospital outside the (clipped, noised) update, and a per-sample gradient does not
exist for a layer that mixes the samples of a batch, so DP-SGD cannot train it."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Default model for 64x64 grayscale: four conv blocks with GroupNorm and a flat linear
    head (~63k parameters). Reached 93% on the held-out Br35H split in 4 centralised Adam
    epochs; the same blocks with a global-average-pool head plateaued near 77%. Few
    parameters also matter for the gate: noise of a given sigma costs less the fewer
    coordinates it hits.

    Each block pools before its ReLU: the same function (ReLU and max commute), with the ReLU
    on a quarter of the values: on one CPU thread an epoch takes 0.89x the time, an evaluation
    0.56x (`python benchmarks/app_layout.py`). The layers
    without parameters moved, so the tensors' names (the manifest) are unchanged."""

    def __init__(self, n_classes: int = 2, width: int = 16, image_size: int = 64) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = [1, width, width * 2, width * 4, width * 4]
        for cin, cout in itertools.pairwise(channels):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.MaxPool2d(2), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        side = image_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(channels[-1] * side * side, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


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
    """ResNet-18 layout (~11M parameters) with GroupNorm (the `bn*` names are kept so that
    manifests of earlier runs still match)."""

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
        logits: torch.Tensor = self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))
        return logits


def densenet121_gn(n_classes: int = 2) -> nn.Module:
    """MONAI's DenseNet121 (2-D, one input channel) with GroupNorm(8) and out-of-place ReLU
    (in-place ReLU breaks the hooks Opacus uses to compute per-sample gradients). MONAI is
    imported here only, so the other networks do not pay for it."""
    from monai.networks.nets.densenet import DenseNet121

    network: nn.Module = DenseNet121(
        spatial_dims=2,
        in_channels=1,
        out_channels=n_classes,
        norm=("group", {"num_groups": 8}),
        act=("relu", {"inplace": False}),
    )
    return network


class FixedFeatureNetwork(nn.Module):
    """A network whose first stage is a fixed transform (no parameters, no buffers) and whose
    `head` is all that trains. The trainer computes the features once per dataset and runs
    DP-SGD on the head alone; `forward` composes both for everyone else."""

    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class ScatterNetLinear(FixedFeatureNetwork):
    """Scattering (J = 2, L = 8: 81 channels at 1/4 of the input size), GroupNorm without
    parameters (per image, data-independent), then one linear layer: 41k trained parameters at
    64x64, the only tensors in the state dict (Tramèr & Boneh 2021's ScatterNet + linear)."""

    def __init__(self, n_classes: int = 2, image_size: int = 64) -> None:
        super().__init__()
        from fedgate.training.scattering import Scattering2D

        self.scattering = Scattering2D(image_size)  # a plain object: not a submodule, not in the state dict
        side = image_size // 4
        channels = self.scattering.channels
        self.head = nn.Sequential(
            nn.GroupNorm(9, channels, affine=False), nn.Flatten(), nn.Linear(channels * side * side, n_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.scattering(x)
