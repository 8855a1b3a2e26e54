"""Intake of the research team's app package (FAB): checked by the hospital's rules, approved by
hash, installed under the hospital's folder by hash, read-only; never by the FAB's own metadata."""

from fedgate.fab.check import VerifiedFab, check_fab, inspect_fab, refuse_unapproved, verify_fab
from fedgate.fab.install import FabInstallError, InstalledFab, install_fab
from fedgate.fab.policy import FabPolicy, parse_fab_policy
from fedgate.fab.report import RULES, ConfigDefault, FabFile, FabRefused, FabReport

__all__ = [
    "RULES",
    "ConfigDefault",
    "FabFile",
    "FabInstallError",
    "FabPolicy",
    "FabRefused",
    "FabReport",
    "InstalledFab",
    "VerifiedFab",
    "check_fab",
    "inspect_fab",
    "install_fab",
    "parse_fab_policy",
    "refuse_unapproved",
    "verify_fab",
]
