"""Inverting Gradients (Geiping et al., NeurIPS 2020): rebuild an image from its gradient.

The attacker knows the model weights (a malicious server chose them) and sees one update.
It starts from random images and moves them, with Adam on the *sign* of the gradient and a
box constraint to valid pixels, so that the gradient each image would produce points the
same way as the observed one (cosine distance over all parameters together), plus a small
total-variation prior. Several random starts; the attacker keeps the one whose gradient
matches best (it never sees the true image). The label comes first, from the last layer's
gradient (iDLG, Zhao et al. 2020): with one image and cross-entropy, only the true class's
row of the last linear layer has a negative gradient.

Many attacks run as one batch (restarts of the target and of the null runs): per-image
gradients come from `torch.func.vmap`, which on one core is 1.5-2x faster per image than a
loop (measured, see the benchmark)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedgate.audit.defaults import DEFAULT_RESTARTS, DEFAULT_STEPS, DEFAULT_TV_WEIGHT
from fedgate.audit.errors import AuditError

Progress = Callable[[int, int], None]


def flat_gradient(model: nn.Module, image: torch.Tensor, label: int) -> torch.Tensor:
    """The gradient of the cross-entropy of one image (1, c, h, w) over all parameters, flat.

    The model is in eval mode (no dropout): the worst case, since in gated mode the
    training code is the attacker's and can turn dropout off."""
    model.eval()
    loss = nn.functional.cross_entropy(model(image), torch.tensor([label]))
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]).detach()


def _last_linear(model: nn.Module) -> tuple[int, int]:
    """(offset, size) of the last nn.Linear's weight inside the flat parameter vector."""
    offsets: dict[int, int] = {}
    offset = 0
    for param in model.parameters():
        offsets[id(param)] = offset
        offset += param.numel()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AuditError("label inference needs a model whose last layer is nn.Linear")
    weight = linears[-1].weight
    return offsets[id(weight)], weight.numel()


def infer_label(model: nn.Module, gradient: torch.Tensor, n_classes: int) -> int:
    """iDLG: the class whose row of the last linear layer's weight gradient sums lowest.

    Row i of that gradient is (p_i - y_i) * h with h >= 0 (ReLU features), so only the true
    class's row is negative; summing the row adds up the signal over all its coordinates,
    which also keeps it readable under noise longer than the bias alone."""
    offset, size = _last_linear(model)
    rows = gradient[offset : offset + size].reshape(n_classes, -1)
    return int(rows.sum(dim=1).argmin())


@dataclass(frozen=True)
class InversionSettings:
    """The attack's knobs. Defaults chosen by measurement (see `fedgate.audit.api`)."""

    steps: int = DEFAULT_STEPS
    restarts: int = DEFAULT_RESTARTS
    lr: float = 0.1
    tv_weight: float = DEFAULT_TV_WEIGHT

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1:
            raise AuditError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")


@dataclass(frozen=True)
class Inversion:
    """Best reconstruction per target (model space, (m, c, h, w)), its matching loss, and
    the number of steps actually run (fewer than `planned` when the time budget cut them)."""

    images: torch.Tensor
    losses: torch.Tensor
    steps: int
    planned: int


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, per image."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def invert(
    model: nn.Module,
    targets: torch.Tensor,
    labels: list[int],
    image_shape: tuple[int, int, int],
    settings: InversionSettings,
    generator: torch.Generator,
    bounds: tuple[float, float],
    progress: Progress | None = None,
    deadline: float | None = None,
) -> Inversion:
    """Invert each row of `targets` (m, n_params: the attacker's gradients) with its label.

    `deadline` (time.monotonic()) caps the run: the pace is measured at every step; after 4
    steps and every 25, if the planned steps would pass the deadline, fewer are planned (the
    learning-rate schedule is laid out again for the steps that will really run), and the
    run stops at once when the next step and the final pass would pass it."""
    model.eval()
    m, restarts = targets.shape[0], settings.restarts
    params = {name: p.detach() for name, p in model.named_parameters()}
    names = list(params)

    def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_image_grad = vmap(grad(loss_of), in_dims=(None, 0, 0))
    batch = m * restarts
    observed = targets.to(torch.float32).repeat_interleave(restarts, dim=0)
    y = torch.tensor(labels, dtype=torch.long).repeat_interleave(restarts)
    lo, hi = bounds
    x = torch.randn((batch, *image_shape), generator=generator).clamp_(lo, hi).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    steps = settings.steps
    schedule = _schedule(optimizer, steps)
    paced_from = time.monotonic()
    matching = torch.zeros(batch)
    step = 0
    while step < steps:
        optimizer.zero_grad()
        grads = per_image_grad(params, x, y)
        flat = torch.cat([grads[name].reshape(batch, -1) for name in names], dim=1)
        matching = 1.0 - nn.functional.cosine_similarity(flat, observed, dim=1)
        loss = (matching + settings.tv_weight * total_variation(x)).sum()
        (x_grad,) = torch.autograd.grad(loss, [x])
        x.grad = x_grad.sign()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
        step += 1
        now = time.monotonic()
        if step == 1:
            paced_from = now  # the first step pays torch.func's one-off set-up (~4 s)
        if deadline is not None:
            per_step = (now - paced_from) / (step - 1) if step > 1 else 0.0
            if now + 2 * per_step >= deadline:
                steps = step  # out of time (one more step and the final pass would pass it): stop here
            elif step == 4 or step % 25 == 0:
                steps, schedule = _replan(optimizer, schedule, step, steps, per_step, deadline - now)
        if progress is not None:
            progress(step, steps)
    with torch.no_grad():
        grads = per_image_grad(params, x, y)
        flat = torch.cat([grads[name].reshape(batch, -1) for name in names], dim=1)
        matching = 1.0 - nn.functional.cosine_similarity(flat, observed, dim=1)
    best = matching.reshape(m, restarts).argmin(dim=1)
    chosen = torch.arange(m) * restarts + best
    return Inversion(x.detach()[chosen], matching.reshape(m, restarts)[torch.arange(m), best], steps, settings.steps)


def _replan(
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LambdaLR,
    step: int,
    steps: int,
    per_step: float,
    left: float,
) -> tuple[int, torch.optim.lr_scheduler.LambdaLR]:
    """Fewer steps when the ones planned would not fit in the `left` seconds at the pace
    since step 1 (the machine is shared; its pace changes), keeping one step's time for the
    final pass; the schedule is laid out again for them."""
    affordable = step + int(left / per_step) - 1
    if affordable >= steps:
        return steps, schedule
    steps = max(step + 1, affordable)
    return steps, _schedule(optimizer, steps, done=step)


def _schedule(optimizer: torch.optim.Optimizer, steps: int, done: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Geiping et al.'s step decay: x0.1 at 3/8, 5/8 and 7/8 of the steps (counted from `done`)."""
    milestones = [steps * f for f in (3 / 8, 5 / 8, 7 / 8)]

    def factor(i: int) -> float:
        return float(0.1 ** sum(done + i >= mark for mark in milestones))

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
