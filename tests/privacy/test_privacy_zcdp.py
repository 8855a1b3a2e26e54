"""The ledger's bits are zCDP's ρ in other units; ε follows from them exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.privacy import (
    PrivacyError,
    UpdateNoiseEvent,
    bits_from_rho,
    epsilon_from_bits,
    epsilon_from_rho,
    hospital_level,
    rho_from_bits,
    rho_from_noise_multiplier,
)


def ledger_bits(z: float) -> float:
    """The gate's bound for the noised update, C²/(2σ² ln 2) with σ = z·C."""
    return 1.0 / (2.0 * z**2 * math.log(2.0))


@settings(max_examples=50, deadline=None)
@given(z=st.floats(1e-3, 1e3))
def test_ledger_bits_are_rho_over_ln2(z: float) -> None:
    assert bits_from_rho(rho_from_noise_multiplier(z)) == pytest.approx(ledger_bits(z), rel=1e-12)
    assert rho_from_bits(bits_from_rho(0.37 * z)) == pytest.approx(0.37 * z, rel=1e-12)


@pytest.mark.parametrize("z", [0.01, 1.0, 2.08])
def test_epsilon_from_ledger_bits_equals_the_accountant(z: float) -> None:
    bits = 12 * ledger_bits(z)
    assert epsilon_from_bits(bits, 1e-5) == pytest.approx(
        hospital_level([UpdateNoiseEvent(z)] * 12, 1e-5).epsilon, rel=1e-4
    )


def test_gaussian_conversion_is_tighter_than_general_zcdp() -> None:
    rho = rho_from_noise_multiplier(1.0) * 12
    exact = epsilon_from_rho(rho, 1e-5)
    general = epsilon_from_rho(rho, 1e-5, conversion="zcdp")
    assert exact < general < rho + 2 * math.sqrt(rho * math.log(1e5))  # Bun & Steinke's simple bound


def test_edges() -> None:
    assert epsilon_from_rho(0.0, 1e-5) == 0.0
    assert math.isinf(epsilon_from_rho(rho_from_noise_multiplier(0.0), 1e-5))
    for bad in (-1.0, float("nan")):
        with pytest.raises(PrivacyError):
            rho_from_bits(bad)
    with pytest.raises(PrivacyError, match="conversion"):
        epsilon_from_rho(1.0, 1e-5, conversion="renyi")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(sigma=st.floats(1e-4, 1e3), log10_delta=st.floats(-12.0, -1.0))
def test_our_analytic_gaussian_is_dp_accountings(sigma: float, log10_delta: float) -> None:
    """The gate's fast path computes dp-accounting's ε, not an approximation of it."""
    from dp_accounting import get_epsilon_gaussian

    from fedgate.privacy.zcdp import analytic_gaussian_epsilon

    delta = 10.0**log10_delta
    assert analytic_gaussian_epsilon(sigma, delta) == pytest.approx(
        get_epsilon_gaussian(sigma, delta), rel=1e-9, abs=1e-12
    )


def test_analytic_gaussian_edges_match_dp_accounting() -> None:
    from dp_accounting import get_epsilon_gaussian

    from fedgate.privacy.zcdp import analytic_gaussian_epsilon

    for sigma, delta in [(0.0, 1e-5), (math.inf, 1e-5), (1.0, 0.0), (1.0, 1.0), (50.0, 0.5), (0.001, 1e-5)]:
        assert analytic_gaussian_epsilon(sigma, delta) == get_epsilon_gaussian(sigma, delta)
    with pytest.raises(PrivacyError):
        analytic_gaussian_epsilon(-1.0, 1e-5)
