"""The hospital's `[training]` policy table, and a recipe checked against it.

    [training]
    mode = "gated"                   # "gated" (default) | "trusted" | "both"
    allowed_models = ["small-cnn"]   # zoo names a recipe may use
    allowed_optimizers = ["sgd", "adam"]
    min_noise_multiplier = 0.5       # the noise floor: z below it is refused
    max_grad_norm_ceiling = 10.0     # per-sample clip norm C above it is refused
    max_local_epochs = 5
    max_batch_size = 512             # expected Poisson batch
    max_image_size = 256
    max_lr = 1.0
    max_classes = 10
    dataset = "folder:/srv/fedgate/images"   # the images trusted mode trains on (never the recipe's choice)

Default-deny: a key the table does not know is an error, and the defaults allow only the
small CNN. Each refusal names its rule (`training.<key>`) and the recipe key it concerns."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedgate.errors import PolicyError
from fedgate.training.catalogue import CATALOGUE
from fedgate.training.errors import RecipeError
from fedgate.training.recipe import OPTIMIZERS, Recipe

MODES = ("gated", "trusted", "both")


@dataclass(frozen=True)
class TrainingPolicy:
    mode: str = "gated"
    allowed_models: tuple[str, ...] = ("small-cnn",)
    allowed_optimizers: tuple[str, ...] = OPTIMIZERS
    min_noise_multiplier: float = 0.5
    max_grad_norm_ceiling: float = 10.0
    max_local_epochs: int = 5
    max_batch_size: int = 512
    max_image_size: int = 256
    max_lr: float = 1.0
    max_classes: int = 10  # the head's size: bounds the network a recipe makes the hospital build
    dataset: str = ""  # a `fedgate.data.load_dataset` spec; "" in simulation (each hospital's share)

    @property
    def allows_trusted(self) -> bool:
        return self.mode in ("trusted", "both")

    @property
    def allows_gated(self) -> bool:
        return self.mode in ("gated", "both")

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> TrainingPolicy:
        """Parse the `[training]` table; errors are `PolicyError`s naming `training.<key>`."""
        known = cls.__dataclass_fields__
        for key in table:
            if key not in known:
                raise PolicyError(f"training.{key}: unknown key (known: {', '.join(known)})")
        defaults = cls()
        values: dict[str, Any] = {}
        for key in known:
            value = table.get(key, getattr(defaults, key))
            values[key] = _parse(key, value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in ((k, getattr(self, k)) for k in self.__dataclass_fields__)
        }


def _parse(key: str, value: Any) -> Any:
    where = f"training.{key}"
    if key == "dataset":
        if not isinstance(value, str):
            raise PolicyError(f"{where} must be a dataset spec string (folder:DIR, dicom:DIR, npz:PATH, br35h)")
        return value
    if key == "mode":
        if value not in MODES:
            raise PolicyError(f"{where} must be one of {', '.join(MODES)}, got {value!r}")
        return value
    if key in ("allowed_models", "allowed_optimizers"):
        choices = tuple(CATALOGUE) if key == "allowed_models" else OPTIMIZERS
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"{where} must be a list of names, got {value!r}")
        for name in value:
            if name not in choices:
                raise PolicyError(f"{where}: {name!r} is not one of {', '.join(choices)}")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise PolicyError(f"{where} must be a positive finite number, got {value!r}")
    if key.startswith("max_") and key != "max_grad_norm_ceiling" and key != "max_lr":
        if not isinstance(value, int):
            raise PolicyError(f"{where} must be an integer, got {value!r}")
        return value
    return float(value)


def validate_recipe(recipe: Recipe, policy: TrainingPolicy) -> None:
    """Refuse a recipe the hospital's policy does not allow (`RecipeError`, rule = the policy key)."""

    def refuse(rule: str, key: str, message: str, value: Any) -> RecipeError:
        return RecipeError(f"training.{rule}", message, key=f"recipe.{key}", value=value, policy=getattr(policy, rule))

    if not policy.allows_trusted:
        raise RecipeError(
            "training.mode", f"this hospital's policy does not allow trusted-mode recipes (mode = {policy.mode!r})"
        )
    if recipe.model not in policy.allowed_models:
        raise refuse(
            "allowed_models",
            "model",
            f"model {recipe.model!r} is not allowed here ({', '.join(policy.allowed_models)})",
            recipe.model,
        )
    if recipe.optimizer not in policy.allowed_optimizers:
        raise refuse(
            "allowed_optimizers", "optimizer", f"optimizer {recipe.optimizer!r} is not allowed", recipe.optimizer
        )
    checks: tuple[tuple[str, str, bool, str], ...] = (
        ("min_noise_multiplier", "noise-multiplier", recipe.noise_multiplier >= policy.min_noise_multiplier,
         f"noise multiplier {recipe.noise_multiplier} is below the floor {policy.min_noise_multiplier}"),
        ("max_grad_norm_ceiling", "max-grad-norm", recipe.max_grad_norm <= policy.max_grad_norm_ceiling,
         f"per-sample clip norm {recipe.max_grad_norm} is above the ceiling {policy.max_grad_norm_ceiling}"),
        ("max_local_epochs", "local-epochs", recipe.local_epochs <= policy.max_local_epochs,
         f"{recipe.local_epochs} local epochs exceed {policy.max_local_epochs}"),
        ("max_batch_size", "batch-size", recipe.batch_size <= policy.max_batch_size,
         f"expected batch {recipe.batch_size} exceeds {policy.max_batch_size}"),
        ("max_image_size", "image-size", recipe.image_size <= policy.max_image_size,
         f"image size {recipe.image_size} exceeds {policy.max_image_size}"),
        ("max_lr", "lr", recipe.lr <= policy.max_lr, f"learning rate {recipe.lr} exceeds {policy.max_lr}"),
        ("max_classes", "classes", recipe.classes <= policy.max_classes,
         f"{recipe.classes} classes exceed {policy.max_classes}"),
    )  # fmt: skip
    for rule, key, ok, message in checks:
        if not ok:
            raise refuse(rule, key, message, getattr(recipe, key.replace("-", "_")))


def with_trusted_mode(text: str) -> str:
    """A policy's text in trusted mode (`fedgate demo --trusted`): its `[training] mode` set to
    "trusted" in place (comments and every other setting kept), or a `[training]` table appended."""
    import re
    import tomllib

    try:
        table = tomllib.loads(text).get("training")
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"the policy is not valid TOML: {err}") from err
    if table is None:
        return text.rstrip("\n") + '\n\n[training]\nmode = "trusted"\n'
    if table.get("mode") == "trusted":
        return text
    lines = text.splitlines(keepends=True)
    inside = False
    for i, line in enumerate(lines):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            inside = header.group(1).strip() == "training"
        elif inside and re.match(r"\s*mode\s*=", line):
            lines[i] = 'mode = "trusted"\n'
            return "".join(lines)
    # a [training] table without a mode line: add it right after the header
    return re.sub(r"(?m)^(\s*\[training\][^\n]*\n)", r'\1mode = "trusted"\n', text, count=1)
