"""A recipe travels in a Flower ConfigRecord and is parsed strictly, naming the bad key."""

from __future__ import annotations

import math
from typing import Any

import pytest
from flwr.app import ConfigRecord

from fedgate.training import Recipe, RecipeError, recipe_to_config

RECIPE = Recipe("small-cnn", 64, 2, "adam", 0.001, 2, 32, 1.0, 1.0)


def config(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = recipe_to_config(RECIPE)
    for key, value in changes.items():
        name = "recipe." + key.replace("_", "-")
        if value is ...:
            values.pop(name)
        else:
            values[name] = value
    return values


def test_round_trip_through_a_flower_config_record_with_other_keys() -> None:
    record = ConfigRecord({**recipe_to_config(RECIPE), "server-round": 3})
    assert Recipe.from_config(record) == RECIPE
    assert recipe_to_config(RECIPE)["recipe.noise-multiplier"] == 1.0
    assert set(recipe_to_config(RECIPE)) == {
        "recipe.model", "recipe.image-size", "recipe.classes", "recipe.optimizer", "recipe.lr",
        "recipe.local-epochs", "recipe.batch-size", "recipe.max-grad-norm", "recipe.noise-multiplier",
        "recipe.augment",
    }  # fmt: skip


def test_optional_augment_defaults_to_none_and_ints_pass_as_floats() -> None:
    recipe = Recipe.from_config(config(augment=..., lr=1, max_grad_norm=2))
    assert recipe.augment == "none" and recipe.lr == 1.0 and isinstance(recipe.lr, float)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"model": "vit-huge"}, "recipe.model"),
        ({"model": 3}, "recipe.model"),
        ({"image_size": 60}, "recipe.image-size"),  # the small CNN needs a multiple of 16
        ({"image_size": 64.0}, "recipe.image-size"),
        ({"image_size": True}, "recipe.image-size"),
        ({"classes": 1}, "recipe.classes"),
        ({"optimizer": "lbfgs"}, "recipe.optimizer"),
        ({"lr": math.nan}, "recipe.lr"),
        ({"lr": math.inf}, "recipe.lr"),
        ({"lr": 0.0}, "recipe.lr"),
        ({"lr": 1e6}, "recipe.lr"),
        ({"lr": "0.001"}, "recipe.lr"),
        ({"local_epochs": 0}, "recipe.local-epochs"),
        ({"batch_size": -32}, "recipe.batch-size"),
        ({"max_grad_norm": -1.0}, "recipe.max-grad-norm"),
        ({"noise_multiplier": 0.0}, "recipe.noise-multiplier"),  # no noise is not a DP-SGD recipe
        ({"noise_multiplier": False}, "recipe.noise-multiplier"),
        ({"noise_multiplier": ...}, "recipe.noise-multiplier"),
        ({"augment": "mixup"}, "recipe.augment"),
    ],
)
def test_bad_values_are_refused_naming_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError) as refused:
        Recipe.from_config(config(**changes))
    assert refused.value.key == key and key in str(refused.value)


def test_unknown_recipe_key_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.dataset") as refused:
        Recipe.from_config({**config(), "recipe.dataset": "/etc/passwd"})
    assert refused.value.rule == "recipe.unknown-key"


def test_an_instruction_without_a_recipe_is_not_a_trusted_task() -> None:
    with pytest.raises(RecipeError, match="no recipe"):
        Recipe.from_config({"server-round": 1, "lr": 0.1})


def test_the_dataclass_itself_refuses_absurd_values() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.lr"):
        Recipe("small-cnn", 64, 2, "adam", -1.0, 2, 32, 1.0, 1.0)
