"""Differential-privacy accounting the hospital can check (dp-accounting behind one small API).

record_level(events, delta)          -> EpsilonStatement   per patient, PLD (+ RDP alongside)
hospital_level(events, delta)        -> EpsilonStatement   the gate's update noise
check_budget(budget, history, next)  -> BudgetDecision     before the event runs
bits <-> rho <-> epsilon                                   the ledger's bits as zCDP
"""

from fedgate.privacy.accountant import ACCOUNTANTS, calibrate_noise_multiplier, hospital_level, merge, record_level
from fedgate.privacy.budget import BudgetDecision, PrivacyBudget, check_budget
from fedgate.privacy.events import DpSgdEvent, PrivacyError, PrivacyEvent, UpdateNoiseEvent, event_from_json
from fedgate.privacy.statement import EpsilonStatement
from fedgate.privacy.zcdp import (
    bits_from_rho,
    epsilon_from_bits,
    epsilon_from_rho,
    rho_from_bits,
    rho_from_noise_multiplier,
)

__all__ = [
    "ACCOUNTANTS",
    "BudgetDecision",
    "DpSgdEvent",
    "EpsilonStatement",
    "PrivacyBudget",
    "PrivacyError",
    "PrivacyEvent",
    "UpdateNoiseEvent",
    "bits_from_rho",
    "calibrate_noise_multiplier",
    "check_budget",
    "epsilon_from_bits",
    "epsilon_from_rho",
    "event_from_json",
    "hospital_level",
    "merge",
    "record_level",
    "rho_from_bits",
    "rho_from_noise_multiplier",
]
