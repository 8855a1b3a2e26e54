"""The audit's defaults, chosen by measurement (see `fedgate.audit.api`). A module of its own
so that the CLI can show them without importing torch."""

from __future__ import annotations

DEFAULT_STEPS = 400
DEFAULT_RESTARTS = 1
DEFAULT_NULL_RUNS = 3
DEFAULT_BUDGET_S = 60.0
DEFAULT_TV_WEIGHT = 0.05
