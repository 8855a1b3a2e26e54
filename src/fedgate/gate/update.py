"""Clipping and noising of the update (reply - global model): the gate's enforced guarantee.

Work is done in float64 over all tensors together; the result is cast back to each
tensor's declared dtype only when the outgoing reply is built."""

from __future__ import annotations

import math
import secrets

import numpy as np

Tensors = dict[str, np.ndarray]


def l2_norm(update: Tensors) -> float:
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in update.values()))


def clip(update: Tensors, clip_norm: float) -> tuple[Tensors, float, float]:
    """Scale the update to L2 norm <= clip_norm. Returns (clipped, norm before, scale).
    An update already inside the ball is returned unchanged (scale 1)."""
    norm = l2_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    if scale == 1.0:
        return update, norm, scale
    return {k: v * scale for k, v in update.items()}, norm, scale


def fresh_generator() -> np.random.Generator:
    """A generator seeded from OS entropy (256 bits) for exactly one reply: the noise is
    unpredictable to the training code and to anyone who sees earlier replies."""
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))


def add_noise(update: Tensors, sigma: float, generator: np.random.Generator) -> Tensors:
    """Gaussian noise N(0, sigma^2) on every coordinate, drawn in float64."""
    if sigma == 0.0:
        return update
    return {k: v + generator.normal(0.0, sigma, size=v.shape) for k, v in update.items()}


def capacity_bits(clip_norm: float, sigma: float) -> float:
    """Upper bound on the information a clipped, noised update carries: the Gaussian channel
    with total power C^2 spread over any number of coordinates, each with noise sigma^2,
    carries at most sum 1/2 log2(1 + P_i/sigma^2) <= C^2 / (2 sigma^2 ln 2) bits."""
    if sigma == 0.0:
        return math.inf
    return clip_norm**2 / (2.0 * sigma**2 * math.log(2.0))
