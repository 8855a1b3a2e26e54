"""Membership inference on a trained model: can an attacker tell the hospital's training
images from images the model never saw?

Two attacks, both scored as ROC AUC with a bootstrap confidence interval (0.5: no better
than a coin; 1.0: every member singled out):

- loss threshold (Yeom et al., CSF 2018): members have lower loss;
- difficulty-calibrated loss (Watson et al., ICLR 2022): the loss minus the loss a
  reference model (trained on other data) gives the same image, so that images that are
  simply easy do not look like members."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedgate.audit.errors import AuditError
from fedgate.audit.sources import to_model_space
from fedgate.canonical import decimal_str


@torch.no_grad()
def per_example_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Cross-entropy of each uint8 image (n, h, w) under the model (eval mode)."""
    model.eval()
    x = to_model_space(images)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    losses = [
        nn.functional.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="none")
        for i in range(0, len(y), batch_size)
    ]
    return torch.cat(losses).numpy().astype(np.float64)


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(member score > non-member score) + 1/2 P(equal): the Mann-Whitney form of ROC AUC."""
    ordered = np.sort(nonmember_scores)
    below = np.searchsorted(ordered, member_scores, side="left")
    not_above = np.searchsorted(ordered, member_scores, side="right")
    return float((below + not_above).sum() / (2.0 * len(member_scores) * len(ordered)))


def bootstrap_ci(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    generator: np.random.Generator,
    resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, members and non-members resampled separately."""
    values = np.empty(resamples)
    for i in range(resamples):
        members = member_scores[generator.integers(0, len(member_scores), len(member_scores))]
        nonmembers = nonmember_scores[generator.integers(0, len(nonmember_scores), len(nonmember_scores))]
        values[i] = auc(members, nonmembers)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


@dataclass(frozen=True)
class MembershipResult:
    method: str  # "loss-threshold" | "calibrated-loss"
    auc: float
    ci_low: float
    ci_high: float
    members: int
    nonmembers: int
    level: float = 0.95

    def to_json(self) -> dict[str, Any]:
        """Canonical (decimal strings), for records that get hashed."""
        return {
            "method": self.method,
            "auc": decimal_str(self.auc, 4),
            "ci_low": decimal_str(self.ci_low, 4),
            "ci_high": decimal_str(self.ci_high, 4),
            "level": decimal_str(self.level, 4),
            "members": self.members,
            "nonmembers": self.nonmembers,
        }


def membership_audit(
    model: nn.Module,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    generator: np.random.Generator,
    reference: nn.Module | None = None,
    resamples: int = 1000,
) -> list[MembershipResult]:
    """Loss-threshold AUC, and the calibrated AUC when a reference model is given.

    `members` / `nonmembers` are (uint8 images, labels): the model's training images and
    images of the same distribution it never trained on (e.g. the hospital's held-out set)."""
    if len(members[1]) == 0 or len(nonmembers[1]) == 0:
        raise AuditError("membership inference needs at least one member and one non-member image")
    member_loss = per_example_loss(model, *members)
    nonmember_loss = per_example_loss(model, *nonmembers)
    scored = [("loss-threshold", -member_loss, -nonmember_loss)]
    if reference is not None:
        scored.append(
            (
                "calibrated-loss",
                per_example_loss(reference, *members) - member_loss,
                per_example_loss(reference, *nonmembers) - nonmember_loss,
            )
        )
    results = []
    for method, member_scores, nonmember_scores in scored:
        low, high = bootstrap_ci(member_scores, nonmember_scores, generator, resamples)
        results.append(
            MembershipResult(
                method, auc(member_scores, nonmember_scores), low, high, len(member_scores), len(nonmember_scores)
            )
        )
    return results
