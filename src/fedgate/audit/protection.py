"""The protection an update gets before the server sees it, simulated for the audit.

The audit attacks the update *as the server would see it*. These functions reproduce the
policy's mechanisms on a single image's gradient — the worst case, one image and one step:

- `none`: the raw update, -lr * g (the control that shows the attack works);
- `gate`: the gate's clip of the whole update to L2 norm C, then Gaussian noise of
  sigma = z * C (`local`) or z * C / sqrt(t) (`distributed`: this hospital's share of noise
  that sums to z * C only under secure aggregation). With `server_sees = "reply"` the
  attacker has this hospital's reply alone — the pessimistic case, as if secure aggregation
  were bypassed (SecAgg+ trusts an honest-but-curious server); with `"sum"` it has what
  honest secure aggregation shows, the sum of t replies (the others: one-image updates of
  other patients, each clipped and noised the same way);
- `dp-sgd`: the trusted trainer's per-sample clip to C and noise z * C on the sum.

The noise here comes from a seeded torch generator: it is a calibration of what the
protection does, not the protection itself (the gate draws its own from OS entropy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedgate.audit.errors import AuditError
from fedgate.canonical import decimal_str

KINDS = ("none", "gate", "dp-sgd")


@dataclass(frozen=True)
class Protection:
    kind: str
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    noise_mode: str = "local"
    hospitals: int = 1
    server_sees: str = "reply"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AuditError(f"protection kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "none":
            return
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise AuditError(f"clip norm must be > 0, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise AuditError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_mode not in ("local", "distributed") or self.hospitals < 1:
            raise AuditError(f"noise mode must be local|distributed with hospitals >= 1, got {self}")
        if self.server_sees not in ("reply", "sum") or (
            self.server_sees == "sum" and (self.kind != "gate" or self.noise_mode != "distributed")
        ):
            raise AuditError(f"server_sees must be 'reply', or 'sum' for distributed gate noise; got {self}")

    @classmethod
    def none(cls) -> Protection:
        return cls("none")

    @classmethod
    def gate(
        cls,
        clip_norm: float,
        noise_multiplier: float,
        noise_mode: str = "local",
        hospitals: int = 1,
        server_sees: str = "reply",
    ) -> Protection:
        return cls("gate", clip_norm, noise_multiplier, noise_mode, hospitals, server_sees)

    @classmethod
    def dp_sgd(cls, max_grad_norm: float, noise_multiplier: float) -> Protection:
        return cls("dp-sgd", max_grad_norm, noise_multiplier)

    @classmethod
    def from_policy(cls, policy: Any) -> Protection:
        """The gate's protection as a `fedgate.policy.Policy` sets it (its `[update]` table)."""
        return cls.gate(
            float(policy.clip_norm), float(policy.noise_multiplier), str(policy.noise_mode), int(policy.hospitals)
        )

    @property
    def sigma(self) -> float:
        """Standard deviation of the noise on each coordinate (of the update for `gate`, of
        the summed clipped gradient for `dp-sgd`)."""
        if self.kind == "none":
            return 0.0
        sigma = self.noise_multiplier * self.clip_norm
        if self.kind == "gate" and self.noise_mode == "distributed":
            return sigma / math.sqrt(self.hospitals)
        return sigma

    def describe(self) -> dict[str, Any]:
        """Canonical description (decimal strings, no floats) for records that get hashed."""
        if self.kind == "none":
            return {"kind": "none"}
        out: dict[str, Any] = {
            "kind": self.kind,
            "clip_norm": decimal_str(self.clip_norm),
            "noise_multiplier": decimal_str(self.noise_multiplier),
            "sigma": decimal_str(self.sigma),
        }
        if self.kind == "gate":
            out |= {"noise_mode": self.noise_mode, "hospitals": self.hospitals, "server_sees": self.server_sees}
        return out

    def label(self) -> str:
        """One line a person reads."""
        if self.kind == "none":
            return "raw update (no protection)"
        if self.kind == "dp-sgd":
            return f"DP-SGD: per-sample clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:g}"
        share = ""
        if self.noise_mode == "distributed":
            seen = "the sum of their replies" if self.server_sees == "sum" else "this hospital's reply alone"
            share = f", {self.hospitals} hospitals, sigma / sqrt({self.hospitals}) each; the server sees {seen}"
        return (
            f"gate: clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:g}, "
            f"sigma {self.sigma:.4g} ({self.noise_mode}{share})"
        )

    def apply(
        self,
        gradient: torch.Tensor,
        generator: torch.Generator,
        lr: float | None = None,
        others: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The update the server sees after one step on one image whose (flat) gradient is `gradient`.

        `lr` is the step size of that step; None takes the worst case: the signal fills the
        clip ball (norm exactly C, the most signal the protection lets through; for `gate`, a
        malicious training code can scale its update up to that, for `dp-sgd` a malicious
        server can choose weights whose per-sample gradients are large) and lr = 1 (the
        attack's cosine loss does not depend on the scale). The attacker's signal-to-noise
        ratio is then 1/z, whatever C. `others`: the gradients of the other
        hospitals' images, needed (t - 1 of them) exactly when `server_sees == "sum"`."""
        expected = self.hospitals - 1 if self.server_sees == "sum" else 0
        if len(others) != expected:
            raise AuditError(f"{self.label()}: needs {expected} other hospitals' gradients, got {len(others)}")
        gradient = gradient.detach().to(torch.float64)
        if self.kind == "none":
            return -(1.0 if lr is None else lr) * gradient
        if self.kind == "dp-sgd":
            norm = float(gradient.norm())
            scale = self.clip_norm / norm if norm > 0 and (lr is None or norm > self.clip_norm) else 1.0
            return -(1.0 if lr is None else lr) * (gradient * scale + self._noise(gradient, generator))
        seen = self._gate_reply(gradient, generator, lr)
        for other in others:
            seen = seen + self._gate_reply(other.detach().to(torch.float64), generator, lr)
        return seen

    def _gate_reply(self, gradient: torch.Tensor, generator: torch.Generator, lr: float | None) -> torch.Tensor:
        norm = float(gradient.norm())
        step = self.clip_norm / norm if lr is None and norm > 0 else (1.0 if lr is None else lr)
        update = -step * gradient
        update_norm = float(update.norm())
        if update_norm > self.clip_norm:
            update = update * (self.clip_norm / update_norm)
        return update + self._noise(gradient, generator)

    def _noise(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.sigma == 0.0:
            return torch.zeros_like(like)
        return torch.randn(like.shape, generator=generator, dtype=torch.float64) * self.sigma


def attacker_gradient(observed_update: torch.Tensor) -> torch.Tensor:
    """What the attacker matches: the observed update divided by -lr. The cosine loss is
    blind to a positive scale, so the attacker needs only the sign, not lr."""
    return -observed_update
