"""What a hospital's training run needs: its configuration, its share of the data, and the
train / evaluate loops. Shared by the ClientApp and the ServerApp."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from fedgate.data import ShareSpec, global_test_dataset, hospital_dataset
from fedgate_medical.data import ImageSet
from fedgate_medical.models import build_model

# One thread per client: on two cores, torch with two threads slows 10-40x as soon as
# another process (the other hospital) also uses the CPU.
torch.set_num_threads(1)


@dataclass(frozen=True)
class AppConfig:
    """The app's run config (`[tool.flwr.app.config]` in pyproject.toml; kebab-case keys)."""

    dataset: str = "br35h"
    image_size: int = 64
    subset: int = 0  # 0 = all images; else a stratified random subset (fast tests)
    partition: str = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0
    model: str = "cnn"
    local_epochs: int = 2
    lr: float = 0.001
    batch_size: int = 32
    num_server_rounds: int = 10
    evaluate_every: int = 1  # the hospitals' federated evaluation: every N rounds and the last; 0: the last only
    num_hospitals: int = 0  # 0 = every node the grid has
    metrics_file: str = ""  # JSON lines of per-round global metrics, read by `fedgate run`

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> AppConfig:
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key in run_config:
                values[field.name] = type(getattr(cls(), field.name))(run_config[key])
        return cls(**values)

    def data_key(self) -> tuple[Any, ...]:
        return (self.dataset, self.image_size, self.subset, self.partition, self.alpha, self.test_fraction, self.seed)


def share_of(cfg: AppConfig) -> ShareSpec:
    return ShareSpec(*cfg.data_key())


def hospital_data(cfg: AppConfig, hospital: int, n_hospitals: int) -> tuple[ImageSet, ImageSet]:
    """A hospital's (train, local validation) sets: 90/10 of its share. fedgate's own split, so
    that a hospital in trusted mode trains on exactly the images this app would."""
    share = share_of(cfg)
    return hospital_dataset(
        share.dataset, hospital, n_hospitals, image_size=share.image_size, subset=share.subset,
        partition=share.partition, alpha=share.alpha, test_fraction=share.test_fraction, seed=share.seed,
    )  # fmt: skip


def global_test_data(cfg: AppConfig, n_hospitals: int) -> ImageSet:
    return global_test_dataset(share_of(cfg), n_hospitals)


def to_tensors(data: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(data.images).float().div_(255.0).sub_(0.5).div_(0.25).unsqueeze(1)
    return images, torch.from_numpy(data.labels)


def new_model(cfg: AppConfig, n_classes: int = 2) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial model everywhere, so runs are comparable
    return build_model(cfg.model, n_classes, cfg.image_size)


@contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """The network's convolutions in the channels-last (NHWC) layout while it works: on one CPU
    thread the small CNN trains an epoch in 0.76x the time, and evaluates (with batches of 64)
    in 0.28x (`python benchmarks/app_layout.py`, against the default layout). The weights return
    to the default layout after, so the arrays a hospital sends are laid out as before."""
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def train(model: nn.Module, data: ImageSet, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """Adam (fresh each round, so no optimiser state crosses rounds) with random horizontal
    flips; returns the mean loss of the last epoch."""
    images, labels = to_tensors(data)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    last = 0.0
    with channels_last(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                x = images[batch]
                flip = torch.rand(len(batch), generator=generator) < 0.5
                x[flip] = x[flip].flip(-1)
                optimizer.zero_grad()
                loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), labels[batch])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                count += len(batch)
            last = total / max(count, 1)
    return last


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged; for more than
    two classes, the mean one-vs-rest AUC. NaN when a class is absent."""
    if scores.ndim == 1:
        pos, neg = labels == 1, labels == 0
        if not pos.any() or not neg.any():
            return float("nan")
        order = np.argsort(scores, kind="mergesort")
        ranks = np.empty(len(scores))
        sorted_scores = scores[order]
        i = 0
        while i < len(scores):
            j = i
            while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
                j += 1
            ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
            i = j + 1
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    if scores.shape[1] == 2:
        return roc_auc(scores[:, 1], labels)
    per_class = [roc_auc(scores[:, c], (labels == c).astype(int)) for c in range(scores.shape[1])]
    return float(np.nanmean(per_class))


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 64) -> tuple[float, float, float]:
    """(loss, accuracy, AUC) on `data`. Batches of 64: of 32 to 600 images, the fastest on one
    thread (a batch's activations stay in the CPU's cache)."""
    images, labels = to_tensors(data)
    images = images.contiguous(memory_format=torch.channels_last)
    with channels_last(model):
        model.eval()
        logits = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(labels), batch_size)])
    loss = float(nn.functional.cross_entropy(logits, labels))
    probs = torch.softmax(logits, dim=1).numpy()
    accuracy = float((probs.argmax(1) == labels.numpy()).mean())
    return loss, accuracy, roc_auc(probs, labels.numpy())
