"""The audit's one entry point: what could an attacker rebuild of this patient from this update?

`audit_update` simulates the hospital's update for one image under the policy's protection,
runs the inversion attack on it and on `null_runs` updates that carry no information about
the image, and scores both against the hospital's own images (`fedgate.audit.scoring`).

The null: the same protection applied to a random direction with the norm of the true
gradient. It goes through exactly the same pipeline (label inference, restarts, steps,
scoring), so it measures what the attack produces from the prior alone — the TV-smoothed
blob, and how well a generic blob happens to match this particular image — and nothing
about the image. (A random *other* patient's update would not do: it carries information
about an image that may look like this one.)

Defaults, chosen by measurement on the 2-core development machine, shared (load 4-6) and
under `nice -n 10` (`benchmarks/leakage_audit.py`): one 64x64 image, SmallCNN, 3,000
candidates, 400 steps, 1 restart, 3 null runs — the four attacks run as one batch (per-image
gradients by vmap, ~1.5-2x faster per image than one at a time). 12 audits took 25-56 s
each; the budget cut 3 of them to 312-366 steps. The attack's power varies by image (a
no-tumour scan's raw update ranked 5-100 over 7 runs of 300-1,000 steps, a tumour scan's
always 1), which is why the CLI's --unprotected control matters.
`budget_s` is a hard cap: when the machine is slower, fewer steps run and the result says
so (`steps` < `planned_steps`, `complete` false)."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedgate.audit import scoring
from fedgate.audit.defaults import DEFAULT_BUDGET_S, DEFAULT_NULL_RUNS, DEFAULT_RESTARTS, DEFAULT_STEPS
from fedgate.audit.errors import AuditError
from fedgate.audit.inversion import InversionSettings, flat_gradient, infer_label, invert
from fedgate.audit.protection import Protection, attacker_gradient
from fedgate.audit.sources import build_model, pixel_bounds, to_model_space, to_pixels
from fedgate.canonical import decimal_str

# Scoring the reconstructions against 3,000 64x64 candidates takes about 0.5 s on an idle
# core, several under load; this much of the budget is kept back for it.
SCORING_RESERVE_S = 3.0

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class AuditImages:
    """The pictures (uint8, (h, w)): patient data. They stay at the hospital: never in
    `to_json`, never in the ledger; the CLI writes them only with --with-images."""

    true: np.ndarray
    reconstruction: np.ndarray
    null: np.ndarray


@dataclass(frozen=True)
class AuditResult:
    verdict: str
    psnr: float
    ssim: float
    rank: int
    null_rank: int  # the best (lowest) rank of the null runs
    null_ranks: tuple[int, ...]
    null_psnr: float
    null_ssim: float
    candidates: int
    rank_threshold: int
    seconds: float
    steps: int
    planned_steps: int
    restarts: int
    label: int
    inferred_label: int
    protection: Protection
    seed: int
    images: AuditImages = field(repr=False, compare=False)
    # audit of a real reply: the cosine between the update and the chosen patient's gradient
    # (`fedgate.audit.reply`); None for a simulated single-image update
    target_cosine: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record for the ledger: scores only (decimal strings, no floats), no images."""
        return {
            "verdict": self.verdict,
            "psnr": decimal_str(self.psnr, 4),
            "ssim": decimal_str(self.ssim, 4),
            "rank": self.rank,
            "null_rank": self.null_rank,
            "null_ranks": list(self.null_ranks),
            "null_psnr": decimal_str(self.null_psnr, 4),
            "null_ssim": decimal_str(self.null_ssim, 4),
            "candidates": self.candidates,
            "rank_threshold": self.rank_threshold,
            "seconds": decimal_str(self.seconds, 4),
            "steps": self.steps,
            "planned_steps": self.planned_steps,
            "complete": self.complete,
            "restarts": self.restarts,
            "label_inferred": self.inferred_label == self.label,
            "protection": self.protection.describe(),
            "seed": str(self.seed),
            **({} if self.target_cosine is None else {"target_cosine": decimal_str(self.target_cosine, 4)}),
        }

    @property
    def complete(self) -> bool:
        """False when the time budget cut the attack short: a weaker attack, so a
        `not-distinguishable` verdict from it is weaker evidence (the CLI says so)."""
        return self.steps >= self.planned_steps

    def summary(self) -> dict[str, Any]:
        """The CLI's `--json` object (numbers as JSON numbers; inf PSNR as null)."""
        return {
            "verdict": self.verdict,
            "psnr": round(self.psnr, 2) if math.isfinite(self.psnr) else None,
            "ssim": round(self.ssim, 4),
            "rank": self.rank,
            "null_rank": self.null_rank,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 1),
        }


def _load_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise AuditError(f"global weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    tensors = {}
    for name, value in state.items():
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AuditError(
                f"global weight {name} has shape {tuple(tensor.shape)}, the model {tuple(expected[name].shape)}"
            )
        tensors[name] = tensor.to(expected[name].dtype)
    model.load_state_dict(tensors, strict=True)


def _pool(image: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The true image first, then every candidate that is not an exact copy of it."""
    if candidates.ndim != 3 or candidates.shape[1:] != image.shape:
        raise AuditError(f"candidates must be (n, {image.shape[0]}, {image.shape[1]}), got {candidates.shape}")
    copies = np.all(candidates == image[None], axis=(1, 2))
    return np.concatenate([image[None], candidates[~copies]]).astype(np.uint8)


def _other_hospitals(
    model: torch.nn.Module, pool: np.ndarray, protection: Protection, n_classes: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """For `server_sees == "sum"`: one-image gradients standing in for the other hospitals'
    replies — random other images of the pool with random labels (any image-label pair is
    a valid update; the attacker knows neither)."""
    if protection.server_sees != "sum":
        return []
    if len(pool) < protection.hospitals:
        raise AuditError(f"simulating {protection.hospitals} hospitals needs that many candidate images")
    picks = 1 + torch.randperm(len(pool) - 1, generator=generator)[: protection.hospitals - 1]
    labels = torch.randint(0, n_classes, (len(picks),), generator=generator)
    return [
        flat_gradient(model, to_model_space(pool[int(i)][None]), int(y)) for i, y in zip(picks, labels, strict=True)
    ]


def audit_update(
    model_name: str,
    global_state: Mapping[str, Any] | None,
    image: np.ndarray,
    label: int,
    candidates: np.ndarray,
    protection: Protection,
    *,
    n_classes: int = 2,
    budget_s: float | None = DEFAULT_BUDGET_S,
    steps: int = DEFAULT_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    null_runs: int = DEFAULT_NULL_RUNS,
    tv_weight: float = InversionSettings.tv_weight,
    lr: float | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Audit one image's update: rebuild it from the update the server would see.

    - `model_name`, `global_state`: a zoo model and the weights the hospital received (what
      a malicious server chose); None keeps the zoo model's initial weights (drawn from `seed`).
    - `image`, `label`: one uint8 (h, w) image of the hospital and its class.
    - `candidates`: the hospital's own images (n, h, w) to rank the true image among (the
      true image is added if absent; exact copies of it are dropped).
    - `protection`: what the update gets before the server sees it (`Protection.none()`,
      `.gate(C, z, mode, hospitals, server_sees)`, `.dp_sgd(C, z)`).
    - `budget_s`: a hard cap on the run's wall time (None: no cap; results then depend on
      the seed alone). `progress(done, total)` is called after every attack step.
    - `lr`: the local step's learning rate (None: the worst case, see `Protection.apply`).
    - `seed`: for the model's initial weights, the simulated noise, the null directions and
      the attack's starts; None draws one from OS entropy. It is recorded in the result.
    """
    seed = secrets.randbits(63) if seed is None else seed
    if image.ndim != 2:
        raise AuditError(f"image must be (h, w), got shape {image.shape}")
    torch.manual_seed(seed)
    model = build_model(model_name, n_classes, image.shape[0])
    if global_state is not None:
        _load_state(model, global_state)
    return audit_model(
        model,
        image,
        label,
        candidates,
        protection,
        n_classes=n_classes,
        budget_s=budget_s,
        steps=steps,
        restarts=restarts,
        null_runs=null_runs,
        tv_weight=tv_weight,
        lr=lr,
        seed=seed,
        progress=progress,
    )


def audit_model(
    model: torch.nn.Module,
    image: np.ndarray,
    label: int,
    candidates: np.ndarray,
    protection: Protection,
    *,
    n_classes: int = 2,
    budget_s: float | None = DEFAULT_BUDGET_S,
    steps: int = DEFAULT_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    null_runs: int = DEFAULT_NULL_RUNS,
    tv_weight: float = InversionSettings.tv_weight,
    lr: float | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """`audit_update` on a model already built and loaded (its last layer an nn.Linear)."""
    started = time.monotonic()
    if image.ndim != 2 or image.dtype != np.uint8:
        raise AuditError(f"image must be uint8 (h, w), got {image.dtype} {image.shape}")
    if not 0 <= label < n_classes:
        raise AuditError(f"label {label} is outside 0..{n_classes - 1}")
    if null_runs < 1:
        raise AuditError("the verdict needs at least one null run")
    settings = InversionSettings(steps=steps, restarts=restarts, tv_weight=tv_weight)
    pool = _pool(image, candidates)
    seed = secrets.randbits(63) if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    x = to_model_space(image[None])
    gradient = flat_gradient(model, x, label)
    others = _other_hospitals(model, pool, protection, n_classes, generator)
    observed = [attacker_gradient(protection.apply(gradient, generator, lr, others))]
    for _ in range(null_runs):
        direction = torch.randn(gradient.shape, generator=generator, dtype=torch.float64)
        direction *= gradient.norm() / direction.norm()
        observed.append(attacker_gradient(protection.apply(direction, generator, lr, others)))
    return attack_and_score(
        model, observed, image, label, pool, protection, settings, generator, seed, started,
        n_classes=n_classes, budget_s=budget_s, progress=progress,
    )  # fmt: skip


def attack_and_score(
    model: torch.nn.Module,
    observed: list[torch.Tensor],
    image: np.ndarray,
    label: int,
    pool: np.ndarray,
    protection: Protection,
    settings: InversionSettings,
    generator: torch.Generator,
    seed: int,
    started: float,
    *,
    n_classes: int,
    budget_s: float | None,
    progress: Progress | None,
    target_cosine: float | None = None,
) -> AuditResult:
    """Invert each of the attacker's gradients `observed` (the update's first, then the null
    runs'), and score the reconstructions against `pool` (the true image first)."""
    targets = torch.stack(observed)
    labels = [infer_label(model, target, n_classes) for target in targets]
    restarts = settings.restarts

    deadline = None if budget_s is None else started + budget_s - SCORING_RESERVE_S
    inversion = invert(
        model,
        targets,
        labels,
        (1, int(image.shape[0]), int(image.shape[1])),
        settings,
        generator,
        pixel_bounds(),
        progress,
        deadline,
    )
    pixels = to_pixels(inversion.images)
    ranks = scoring.reidentification_ranks(pool, 0, pixels)
    null_ranks = tuple(ranks[1:])
    best_null = 1 + int(np.argmin(null_ranks))
    return AuditResult(
        verdict=scoring.verdict(ranks[0], list(null_ranks), len(pool)),
        psnr=scoring.psnr(image, pixels[0]),
        ssim=scoring.ssim(image, pixels[0]),
        rank=ranks[0],
        null_rank=min(null_ranks),
        null_ranks=null_ranks,
        null_psnr=scoring.psnr(image, pixels[best_null]),
        null_ssim=scoring.ssim(image, pixels[best_null]),
        candidates=len(pool),
        rank_threshold=scoring.rank_threshold(len(pool)),
        seconds=time.monotonic() - started,
        steps=inversion.steps,
        planned_steps=inversion.planned,
        restarts=restarts,
        label=label,
        inferred_label=labels[0],
        protection=protection,
        seed=seed,
        images=AuditImages(image.copy(), pixels[0], pixels[best_null]),
        target_cosine=target_cosine,
    )
