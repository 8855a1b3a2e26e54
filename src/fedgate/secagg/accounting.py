"""The bound of a masked reply, computed for what the server sees: the sum.

Each gate adds noise of standard deviation sigma_h per coordinate (in `noise_mode =
"distributed"`, sigma_h = z·C / sqrt(t)). The server sees only the sum of the survivors' released
updates; if at least t of them carry honest noise, the sum holds noise of variance at least
t·sigma_h^2 on every coordinate, and one hospital's update (norm at most the effective norm E)
passes through a Gaussian channel of noise sigma_h·sqrt(t):

    sum_bits = E^2 / (2 t sigma_h^2 ln 2)   = reply_bits / t

where reply_bits is what the same reply would carry if the server saw it alone. With
sigma_h = z·C/sqrt(t) that is the gated mode's 1/(2 z^2 ln 2) per round, for t times less
noise per hospital: at the same accuracy of the aggregate, t times fewer bits per hospital.

The number is only as good as its assumption, which goes into the ledger beside it (`ASSUMPTION`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedgate.canonical import decimal_str
from fedgate.gate.update import capacity_bits, effective_norm, grid_step

ASSUMPTION = (
    "every sum the server unmasks holds the replies of at least {t} hospitals whose gates added honest noise "
    "(the protocol guarantees {threshold} replies in a sum; that {t} of them are honest is assumed); the server "
    "follows the protocol (Flower's SecAgg+ does not authenticate public keys: a server running Sybil nodes can "
    "isolate one reply); the sum of the hospitals' rounded Gaussian noise is treated as a Gaussian of the summed "
    "variance (each is at least 256 grid steps wide)"
)


@dataclass(frozen=True)
class SumBound:
    coordinates: int
    clip_norm: float
    sigma_hospital: float  # what this gate adds per coordinate
    assumed_honest: int  # t
    threshold: int  # the protocol's reconstruction threshold for this round (0: not known yet)
    grid_step: float
    effective_norm: float
    reply_bits: float  # the reply alone
    sum_bits: float  # about this hospital, from the sum, under the assumption

    @property
    def sigma_sum(self) -> float:
        return self.sigma_hospital * math.sqrt(self.assumed_honest)

    @property
    def assumption(self) -> str:
        return ASSUMPTION.format(t=self.assumed_honest, threshold=self.threshold or self.assumed_honest)

    def to_json(self) -> dict[str, Any]:
        return {
            "coordinates": self.coordinates,
            "clip_norm": decimal_str(self.clip_norm),
            "sigma_hospital": decimal_str(self.sigma_hospital),
            "sigma_sum": decimal_str(self.sigma_sum),
            "assumed_honest": self.assumed_honest,
            "threshold": self.threshold,
            "grid_step": decimal_str(self.grid_step),
            "effective_norm": decimal_str(self.effective_norm),
            "reply_bits": decimal_str(self.reply_bits),
            "sum_bits": decimal_str(self.sum_bits),
            "assumption": self.assumption,
        }


def sum_bound(
    clip_norm: float, sigma_hospital: float, coordinates: int, assumed_honest: int, threshold: int = 0
) -> SumBound:
    """The bound for a reply that reaches the server only inside a sum with >= t honest replies."""
    if assumed_honest < 1:
        raise ValueError(f"assumed_honest must be >= 1, got {assumed_honest}")
    grid = grid_step(sigma_hospital, clip_norm, coordinates)
    norm = effective_norm(clip_norm, grid, coordinates)
    reply = capacity_bits(norm, sigma_hospital)
    total = capacity_bits(norm, sigma_hospital * math.sqrt(assumed_honest))
    return SumBound(coordinates, clip_norm, sigma_hospital, assumed_honest, threshold, grid, norm, reply, total)


__all__ = ["ASSUMPTION", "SumBound", "sum_bound"]
