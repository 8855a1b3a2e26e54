"""An (ε, δ) statement: the evidence a ledger entry and a report carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fedgate.canonical import canonical_json
from fedgate.privacy.events import PrivacyEvent, exact_str

Level = Literal["record", "hospital"]

# What "neighbouring" means for each level, in words a DPO can repeat.
NEIGHBOURING = {
    "record": "add or remove one record (image) of the hospital's training set",
    "hospital": "the hospital's clipped update against no update at all (sensitivity C)",
    "hospital-replace": "any two datasets of the hospital (sensitivity 2C)",
}


@dataclass(frozen=True)
class EpsilonStatement:
    """The composition of `events` is (`epsilon`, `delta`)-DP under `neighbouring`, computed by
    `accountant` (primary); `alongside` holds the same figure from the other accountants."""

    level: Level
    epsilon: float
    delta: float
    accountant: str
    alongside: tuple[tuple[str, float], ...]
    events: tuple[PrivacyEvent, ...]
    neighbouring: str
    library: str
    discretisation: float | None = None  # the PLD accountant's value discretisation interval

    def epsilon_by(self, accountant: str) -> float:
        if accountant == self.accountant:
            return self.epsilon
        return dict(self.alongside)[accountant]

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "epsilon": exact_str(self.epsilon),
            "delta": exact_str(self.delta),
            "accountant": self.accountant,
            "alongside": {name: exact_str(value) for name, value in self.alongside},
            "events": [event.to_json() for event in self.events],
            "neighbouring": self.neighbouring,
            "library": self.library,
            "discretisation": None if self.discretisation is None else exact_str(self.discretisation),
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())
