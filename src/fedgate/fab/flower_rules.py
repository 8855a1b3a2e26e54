"""Flower's own FAB rules, imported here and only here (tests/fab/test_fab_check.py pins them).

None of these is Flower's public app API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`): they
are the constants and validators `flwr build` and Flower's app hub use. Keeping them in one module
means a Flower upgrade that moves or changes them breaks here and in its contract test, loudly."""

from __future__ import annotations

from flwr.common.config import validate_config
from flwr.common.constant import FAB_INCLUDE_PATTERNS, FAB_MAX_SIZE
from flwr.supercore.constant import (
    APP_ID_PATTERN,
    APP_VERSION_PATTERN,
    MAX_DIR_DEPTH,
    MAX_FILE_BYTES,
    MAX_FILE_COUNT,
    MAX_NAME_LENGTH,
    MAX_TOTAL_BYTES,
)
from flwr.supercore.utils import is_valid_name

__all__ = [
    "APP_ID_PATTERN",
    "APP_VERSION_PATTERN",
    "FAB_INCLUDE_PATTERNS",
    "FAB_MAX_SIZE",
    "MAX_DIR_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_FILE_COUNT",
    "MAX_NAME_LENGTH",
    "MAX_TOTAL_BYTES",
    "is_valid_name",
    "validate_config",
]
