"""The hospital's own trainer for trusted mode: a recipe (zoo model + DP-SGD settings) checked
against the hospital's `[training]` policy, planned, and run with Opacus on the hospital's data.

    recipe = Recipe.from_config(config_record)          # strict; RecipeError names the key
    validate_recipe(recipe, TrainingPolicy.from_dict(policy["training"]))
    check_arrays(recipe.model, recipe.classes, recipe.image_size, arrays)
    event = fedgate.training.plan.planned_event(recipe, len(train_set))   # what is accounted
    result = fedgate.training.trainer.train_dp(recipe, train_set, arrays, seed=None)

Importing this package loads no torch: the policy parser and the recipe reader need only the
catalogue. The zoo's names (`ZOO`, `build_model`, ...) import torch on first use.
`plan` (dp-accounting) and `trainer` (Opacus) are imported where they are used."""

from typing import Any

from fedgate.training.errors import RecipeError
from fedgate.training.policy import MODES, TrainingPolicy, validate_recipe
from fedgate.training.recipe import PREFIX, Recipe, recipe_to_config

_ZOO_NAMES = ("ZOO", "build_model", "check_arrays", "manifest", "manifest_of_arrays", "zoo_names")


def __getattr__(name: str) -> Any:
    if name in _ZOO_NAMES:
        from fedgate.training import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'fedgate.training' has no attribute {name!r}")


__all__ = [
    "MODES",
    "PREFIX",
    "ZOO",
    "Recipe",
    "RecipeError",
    "TrainingPolicy",
    "build_model",
    "check_arrays",
    "manifest",
    "manifest_of_arrays",
    "recipe_to_config",
    "validate_recipe",
    "zoo_names",
]
