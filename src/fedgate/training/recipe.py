"""A trusted-mode recipe: what to train, carried in Flower's own ConfigRecord.

A stock Flower strategy sends it as flat `recipe.*` keys in the train instruction's config
(`recipe_to_config`); the hospital parses it strictly (`Recipe.from_config`): a recipe key
that is unknown, missing, of the wrong type, not finite or absurd is refused with the key
named. The recipe says *how* to train, never *on what*: the data is the hospital's own,
chosen by its configuration."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedgate.training.catalogue import CATALOGUE, model_spec
from fedgate.training.errors import RecipeError

PREFIX = "recipe."
OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("none", "hflip")


@dataclass(frozen=True)
class _Key:
    """How one recipe key is read: its type and the range outside which a value is absurd."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[str, ...] | None = None
    required: bool = True


# Sanity bounds only (an lr of 1e6, 0 classes, a NaN): what a hospital allows is its policy's job.
_KEYS: dict[str, _Key] = {
    "model": _Key(str, choices=tuple(CATALOGUE)),
    "image-size": _Key(int, 8, 1024),
    "classes": _Key(int, 2, 1000),
    "optimizer": _Key(str, choices=OPTIMIZERS),
    "lr": _Key(float, 0.0, 10.0),
    "local-epochs": _Key(int, 1, 1000),
    "batch-size": _Key(int, 1, 1_000_000),
    "max-grad-norm": _Key(float, 0.0, 1e4),
    "noise-multiplier": _Key(float, 0.0, 1e4),
    "augment": _Key(str, choices=AUGMENTATIONS, required=False),
}
_DEFAULTS: dict[str, Any] = {"augment": "none"}


@dataclass(frozen=True)
class Recipe:
    """DP-SGD on a zoo model. `batch_size` is the *expected* Poisson batch (sample rate
    batch_size / n); `noise_multiplier` z gives noise of standard deviation z·max_grad_norm."""

    model: str
    image_size: int
    classes: int
    optimizer: str
    lr: float
    local_epochs: int
    batch_size: int
    max_grad_norm: float
    noise_multiplier: float
    augment: str = "none"

    def __post_init__(self) -> None:
        for field in fields(self):
            _check(field.name.replace("_", "-"), getattr(self, field.name))
        model_spec(self.model).check_image_size(self.image_size)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Recipe:
        """Parse the `recipe.*` keys of a ConfigRecord (other keys, e.g. `server-round`, are not
        the recipe's and are left to the caller)."""
        present = {key[len(PREFIX) :]: value for key, value in config.items() if key.startswith(PREFIX)}
        if not present:
            raise RecipeError("recipe", "the instruction carries no recipe.* keys: it is not a trusted-mode task")
        for name in present:
            if name not in _KEYS:
                raise RecipeError(
                    "recipe.unknown-key",
                    f"unknown recipe key {PREFIX}{name} (known: {', '.join(PREFIX + k for k in _KEYS)})",
                    key=PREFIX + name,
                )
        values: dict[str, Any] = {}
        for name, spec in _KEYS.items():
            if name not in present:
                if spec.required:
                    raise RecipeError(f"recipe.{name}", f"the recipe lacks {PREFIX}{name}", key=PREFIX + name)
                values[name] = _DEFAULTS[name]
                continue
            values[name] = _check(name, present[name])
        return cls(**{name.replace("-", "_"): value for name, value in values.items()})


def _check(name: str, value: Any) -> Any:
    spec = _KEYS[name]
    key = PREFIX + name

    def refuse(message: str) -> RecipeError:
        return RecipeError(f"recipe.{name}", f"{key} {message}, got {value!r}", key=key, value=repr(value))

    if spec.kind is str:
        if not isinstance(value, str):
            raise refuse("must be a string")
        if spec.choices is not None and value not in spec.choices:
            raise refuse(f"must be one of {', '.join(spec.choices)}")
        return value
    if isinstance(value, bool):  # bool is an int in Python; never a number here
        raise refuse("must be a number, not a boolean")
    if spec.kind is int and not isinstance(value, int):
        raise refuse("must be an integer")
    if spec.kind is float:
        if not isinstance(value, int | float):
            raise refuse("must be a number")
        if not math.isfinite(value):
            raise refuse("must be finite")
        value = float(value)
    if spec.kind is float and not spec.low < value <= spec.high:
        raise refuse(f"must be in ({spec.low:g}, {spec.high:g}]")
    if spec.kind is int and not spec.low <= value <= spec.high:
        raise refuse(f"must be in [{spec.low:g}, {spec.high:g}]")
    return value


def recipe_to_config(recipe: Recipe) -> dict[str, int | float | str]:
    """The flat `recipe.*` keys for a Flower ConfigRecord (e.g. FedAvg's `train_config`)."""
    return {PREFIX + field.name.replace("_", "-"): getattr(recipe, field.name) for field in fields(recipe)}
