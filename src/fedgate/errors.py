"""One exception root. Each subclass says what failed and what the user can do next."""

from __future__ import annotations

from typing import Any


class FedgateError(Exception):
    """Root of every error fedgate raises on purpose."""


class PolicyError(FedgateError):
    """The hospital's policy file is missing, malformed or has a bad value; the message names the key."""


class AppLoadError(FedgateError):
    """A `MODULE:ATTR` reference does not import or is not the kind of Flower app expected."""


class LedgerError(FedgateError):
    """The ledger cannot be read or written; nothing is sent while this is raised."""


class LedgerVerificationError(LedgerError):
    """The ledger does not verify: `seq` names the first broken entry (None: the tree head)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


# The only words a server ever gets for a refusal, whatever the reason (the reason stays in the
# hospital's ledger). Here, not in the gate, so that the simulation's relay (imported by Flower's
# actors) has it without importing the gate.
GENERIC_REFUSAL = "refused by the hospital's egress gate"


class GateRefusal(FedgateError):
    """The gate refused a reply. `rule` names the rule; `detail` holds the offending
    key / shape / value. Both stay at the hospital: the server only learns 'refused'."""

    def __init__(self, rule: str, message: str, **detail: Any) -> None:
        super().__init__(f"[{rule}] {message}")
        self.rule = rule
        self.detail = detail
