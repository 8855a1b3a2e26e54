"""The ledger's bits and zero-concentrated DP (zCDP) are the same number in different units.

The gate states a bound of C²/(2σ² ln 2) = 1/(2z² ln 2) bits per reply: the Shannon capacity
of the clipped-plus-noise channel. The Gaussian mechanism with noise multiplier z is exactly
ρ-zCDP with ρ = 1/(2z²) (Bun & Steinke 2016), so bits = ρ / ln 2, and ρ adds up over replies
as bits do. Only the bits of the *noised update* convert; the metric and send/no-send bits
of a reply are not Gaussian and have no ρ.

Which ε(δ): a sum of Gaussian mechanisms' ρ is itself a single Gaussian mechanism with
μ = √(2ρ) (μ-GDP, Dong, Roth & Su 2019), whose exact ε(δ) is the analytic Gaussian mechanism
(Balle & Wang 2018, Thm. 8): `conversion="gaussian"`, the default, exact and therefore the
tightest. For a ρ that did not come from Gaussian noise alone, `conversion="zcdp"` applies the
best general zCDP-to-(ε, δ) conversion (Canonne, Kamath & Steinke 2020, Prop. 12; the same
bound dp-accounting applies to RDP curves), which is looser."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from fedgate.privacy.events import PrivacyError

LN2 = math.log(2.0)
_ORDERS = np.concatenate([np.linspace(1.001, 2.0, 200), np.geomspace(2.0, 1e6, 2000)[1:]])


def rho_from_noise_multiplier(noise_multiplier: float) -> float:
    """ρ of one Gaussian release with noise multiplier z = σ/Δ: 1/(2z²) (∞ without noise)."""
    if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
        raise PrivacyError(f"noise multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    return math.inf if noise_multiplier == 0 else 1.0 / (2.0 * noise_multiplier**2)


def bits_from_rho(rho: float) -> float:
    """The ledger's bits for ρ: ρ / ln 2."""
    if not rho >= 0:
        raise PrivacyError(f"rho must be >= 0, got {rho!r}")
    return rho / LN2


def rho_from_bits(bits: float) -> float:
    """ρ for the ledger's update bits (summed over replies): bits · ln 2."""
    if not bits >= 0:
        raise PrivacyError(f"bits must be >= 0, got {bits!r}")
    return bits * LN2


def epsilon_from_rho(rho: float, delta: float, *, conversion: Literal["gaussian", "zcdp"] = "gaussian") -> float:
    """ε at δ for a total ρ (see the module docstring for the two conversions)."""
    if not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    if not rho >= 0:
        raise PrivacyError(f"rho must be >= 0, got {rho!r}")
    if rho == 0:
        return 0.0
    if math.isinf(rho):
        return math.inf
    if conversion == "gaussian":
        return analytic_gaussian_epsilon(1.0 / math.sqrt(2.0 * rho), delta)
    if conversion == "zcdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        epsilon, _ = rdp_privacy_accountant.compute_epsilon(_ORDERS, _ORDERS * rho, delta)
        return float(epsilon)
    raise PrivacyError(f"conversion must be 'gaussian' or 'zcdp', got {conversion!r}")


def analytic_gaussian_epsilon(sigma: float, delta: float, tol: float = 1.0e-12) -> float:
    """ε at δ of one Gaussian mechanism of sensitivity 1 and noise σ (Balle & Wang 2018, Eq. 6).

    dp-accounting's `get_epsilon_gaussian`, step for step (same bracket, same brentq, same
    tolerance: `tests/privacy/test_privacy_zcdp.py` holds the two equal), calling the normal
    log-CDF as `scipy.special.log_ndtr` — what `scipy.stats.norm.logcdf` computes — instead of
    through scipy.stats' generic wrapper, which took ~12 ms of the gate's ~0.2 s per reply."""
    from scipy.optimize import brentq  # imported on use: scipy costs seconds at start-up
    from scipy.special import log_ndtr

    if sigma < 0 or not 0.0 <= delta <= 1.0:
        raise PrivacyError(f"sigma must be >= 0 and delta in [0, 1], got {sigma!r}, {delta!r}")
    if delta == 1.0 or sigma == math.inf:
        return 0.0
    if sigma == 0.0 or delta == 0.0:
        return math.inf

    def log_delta(eps: float) -> float:
        t_star = eps * sigma + 1.0 / (2.0 * sigma)
        x = float(log_ndtr(1.0 / sigma - t_star))
        y = eps + float(log_ndtr(-t_star))
        return x + math.log1p(-math.exp(y - x)) if y <= x else -math.inf

    target = math.log(delta)
    if log_delta(0.0) < target:
        return 0.0  # (0, δ)-DP
    low, high = 0.0, 1.0
    while log_delta(high) > target:
        low, high = high, high * 10.0
    return float(brentq(lambda eps: log_delta(eps) - target, low, high, xtol=tol))


def epsilon_from_bits(bits: float, delta: float) -> float:
    """ε at δ of the gate's update noise, from the ledger's cumulative update bits (exact)."""
    return epsilon_from_rho(rho_from_bits(bits), delta)
