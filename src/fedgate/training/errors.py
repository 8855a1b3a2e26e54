"""What the hospital's trainer refuses, and why."""

from __future__ import annotations

from typing import Any

from fedgate.errors import FedgateError


class RecipeError(FedgateError):
    """A training recipe was refused. `rule` names the rule (`recipe.lr`, `training.min_noise_multiplier`,
    `manifest`, ...); `key` the offending recipe key, when there is one; `detail` the values. Like a
    gate refusal, it stays at the hospital: the server only learns that the task was refused."""

    def __init__(self, rule: str, message: str, *, key: str | None = None, **detail: Any) -> None:
        super().__init__(f"[{rule}] {message}")
        self.rule = rule
        self.key = key
        self.detail = detail
