"""The audit of a real reply, as the gate runs it: the update that is about to leave, not a
simulation of one.

`audit_update` asks "what could an attacker rebuild of *this* patient from a one-image
update under this protection?". At the gate the question is about the reply in hand: its
update (clipped, noised) came from the research team's code, trained on some of the
hospital's images, and nobody says which. So:

1. **Which patient.** The patient whose own gradient the update resembles most: for every
   image of the hospital, the cosine between the update's last-layer block and that image's
   last-layer gradient, (p - y) h^T (h: the features entering the last linear layer, p the
   softmax, y the one-hot label) — one forward pass per image, so all of them are checked.
   A reply that is one patient's gradient points at that patient; an honest reply averaged
   over many images points at whoever is most like the average, and the attack then has to
   rebuild that patient from it to count.
2. **The attack.** Inverting Gradients on the update itself, against the weights the server
   sent (the model handed in), exactly as `audit_update` runs it.
3. **The null.** The same attack on `null_runs` updates with no information about any image:
   a random direction of the update's norm before noise, plus the gate's noise (sigma).
4. **The score.** The chosen patient's rank among the hospital's images against the
   reconstruction, beside the nulls' ranks (`fedgate.audit.scoring.verdict`).

The chosen patient is fixed before the reconstruction is scored (from the gradient alone), so
the rank is that of a patient named in advance, as in `audit_update`, not the best of many."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedgate.audit.api import AuditResult, Progress, _pool, attack_and_score
from fedgate.audit.defaults import DEFAULT_BUDGET_S, DEFAULT_NULL_RUNS, DEFAULT_RESTARTS, DEFAULT_STEPS
from fedgate.audit.errors import AuditError
from fedgate.audit.inversion import InversionSettings
from fedgate.audit.protection import Protection, attacker_gradient
from fedgate.audit.sources import to_model_space

BATCH = 256


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AuditError("the audit needs a model whose last layer is nn.Linear")
    return linears[-1]


def _weight_offset(model: nn.Module, weight: torch.Tensor) -> int:
    offset = 0
    for param in model.parameters():
        if param is weight:
            return offset
        offset += param.numel()
    raise AuditError("the last linear layer's weight is not a parameter of the model")


def target_cosines(model: nn.Module, gradient: torch.Tensor, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each image, the cosine between the last-layer weight block of `gradient` (flat,
    over model.parameters(), in the direction of a gradient) and that image's own last-layer
    weight gradient (p - y) h^T."""
    model.eval()
    head = _last_linear(model)
    rows = head.weight.shape[0]
    offset = _weight_offset(model, head.weight)
    block = gradient[offset : offset + head.weight.numel()].reshape(head.weight.shape).to(torch.float64)
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: features.append(args[0].detach()))
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                features.clear()
                logits = model(to_model_space(images[start : start + BATCH]))
                h = features[0].to(torch.float64).flatten(1)
                p = torch.softmax(logits.to(torch.float64), dim=1)
                y = torch.nn.functional.one_hot(torch.as_tensor(labels[start : start + BATCH]), rows)
                a = p - y
                inner = torch.einsum("nk,kd,nd->n", a, block, h)
                norms = a.norm(dim=1) * h.norm(dim=1) * block.norm()
                out.append(torch.where(norms > 0, inner / norms.clamp_min(1e-300), torch.zeros_like(inner)))
    finally:
        hook.remove()
    return torch.cat(out).numpy()


def flat_update(model: nn.Module, update: Mapping[str, np.ndarray]) -> torch.Tensor:
    """The update (sent - received) over the model's parameters, flat, in their order."""
    parts = []
    for name, param in model.named_parameters():
        if name not in update:
            raise AuditError(f"the update has no tensor {name!r} of the model")
        value = torch.as_tensor(np.asarray(update[name], dtype=np.float64))
        if tuple(value.shape) != tuple(param.shape):
            raise AuditError(f"update tensor {name} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
        parts.append(value.reshape(-1))
    return torch.cat(parts)


def audit_reply(
    model: nn.Module,
    update: Mapping[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    protection: Protection,
    *,
    sigma: float,
    signal_norm: float,
    n_classes: int,
    candidates: int = 0,
    budget_s: float | None = DEFAULT_BUDGET_S,
    steps: int = DEFAULT_STEPS,
    restarts: int = DEFAULT_RESTARTS,
    null_runs: int = DEFAULT_NULL_RUNS,
    seed: int | None = None,
    progress: Progress | None = None,
) -> AuditResult:
    """Audit the update that is about to leave (see the module's doc).

    - `model`: the zoo network with the weights the hospital received loaded; `update`: the
      outgoing tensors minus the received ones, by name (as the server will compute it).
    - `images`, `labels`: the hospital's own images (uint8 (n, h, w)) and classes.
    - `protection`: what the gate applied (recorded with the result); `sigma`: the noise it
      added per coordinate; `signal_norm`: the update's norm before the noise (after the clip),
      the norm the null runs' directions get.
    - `candidates`: rank among the chosen patient and this many of the others drawn at random
      (0: all of them); the patient is chosen among all.
    """
    started = time.monotonic()
    seed = secrets.randbits(63) if seed is None else seed
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) < 2 or labels.shape != (len(images),):
        raise AuditError(f"the audit needs >= 2 uint8 images (n, h, w) with labels; got {images.dtype} {images.shape}")
    if null_runs < 1:
        raise AuditError("the verdict needs at least one null run")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise AuditError(f"the hospital's labels are outside 0..{n_classes - 1} of the model's classes")
    generator = torch.Generator().manual_seed(seed)
    observed = flat_update(model, update)
    gradient = attacker_gradient(observed)  # the attacker matches -update / lr; the cosine ignores lr
    cosines = target_cosines(model, gradient, images, labels)
    index = int(np.argmax(cosines))
    pool = _pool(images[index], np.delete(images, index, axis=0))
    if candidates and len(pool) > candidates:
        others = 1 + torch.randperm(len(pool) - 1, generator=generator)[: candidates - 1].numpy()
        pool = np.concatenate([pool[:1], pool[np.sort(others)]])
    targets = [gradient]
    for _ in range(null_runs):
        direction = torch.randn(observed.shape, generator=generator, dtype=torch.float64)
        direction *= signal_norm / float(direction.norm())
        noise = torch.randn(observed.shape, generator=generator, dtype=torch.float64) * sigma
        targets.append(attacker_gradient(direction + noise))
    settings = InversionSettings(steps=steps, restarts=restarts)
    return attack_and_score(
        model, targets, images[index], int(labels[index]), pool, protection, settings, generator, seed, started,
        n_classes=n_classes, budget_s=budget_s, progress=progress, target_cosine=float(cosines[index]),
    )  # fmt: skip
