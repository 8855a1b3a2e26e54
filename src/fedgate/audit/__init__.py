"""Leakage audit: what an attacker could rebuild of the hospital's patients from an update
(gradient inversion, scored by re-identification against a null run) and from a trained
model (membership inference). Runs where the data is; its images never leave.

The names below load on first use, so that importing `fedgate.audit.defaults` (the CLI does,
at start-up) does not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedgate.audit.api import AuditImages, AuditResult, audit_update
    from fedgate.audit.errors import AuditError
    from fedgate.audit.membership import MembershipResult, membership_audit
    from fedgate.audit.protection import Protection

_WHERE = {
    "AuditError": "fedgate.audit.errors",
    "AuditImages": "fedgate.audit.api",
    "AuditResult": "fedgate.audit.api",
    "MembershipResult": "fedgate.audit.membership",
    "Protection": "fedgate.audit.protection",
    "audit_update": "fedgate.audit.api",
    "membership_audit": "fedgate.audit.membership",
}
__all__ = [
    "AuditError",
    "AuditImages",
    "AuditResult",
    "MembershipResult",
    "Protection",
    "audit_update",
    "membership_audit",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedgate.audit' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
