"""The audit's one exception (under fedgate's root)."""

from __future__ import annotations

from fedgate.errors import FedgateError


class AuditError(FedgateError):
    """The audit cannot run as asked (bad protection, model, image or candidates); the message says why."""
