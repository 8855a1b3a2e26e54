"""The `[training]` policy table, and a recipe outside it refused with the rule named."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fedgate.errors import PolicyError
from fedgate.training import Recipe, RecipeError, TrainingPolicy, validate_recipe

RECIPE = Recipe("small-cnn", 64, 2, "adam", 0.001, 2, 32, 1.0, 1.0)
TRUSTED = TrainingPolicy.from_dict({"mode": "trusted"})


def test_defaults_are_gated_and_the_small_cnn_only() -> None:
    policy = TrainingPolicy.from_dict({})
    assert policy.mode == "gated" and policy.allows_gated and not policy.allows_trusted
    assert policy.allowed_models == ("small-cnn",)
    both = TrainingPolicy.from_dict({"mode": "both", "allowed_models": ["small-cnn", "densenet121-gn"]})
    assert both.allows_gated and both.allows_trusted
    assert TrainingPolicy.from_dict(both.to_dict()) == both


def test_a_recipe_inside_the_policy_passes() -> None:
    validate_recipe(RECIPE, TRUSTED)


@pytest.mark.parametrize(
    ("policy", "change", "rule", "key"),
    [
        ({"mode": "gated"}, {}, "training.mode", None),
        ({}, {"model": "resnet18-gn"}, "training.allowed_models", "recipe.model"),
        ({"allowed_optimizers": ["sgd"]}, {}, "training.allowed_optimizers", "recipe.optimizer"),
        ({"min_noise_multiplier": 1.5}, {}, "training.min_noise_multiplier", "recipe.noise-multiplier"),
        ({"max_grad_norm_ceiling": 0.5}, {}, "training.max_grad_norm_ceiling", "recipe.max-grad-norm"),
        ({"max_local_epochs": 1}, {}, "training.max_local_epochs", "recipe.local-epochs"),
        ({"max_batch_size": 16}, {}, "training.max_batch_size", "recipe.batch-size"),
        ({"max_image_size": 32}, {}, "training.max_image_size", "recipe.image-size"),
        ({"max_lr": 1e-4}, {}, "training.max_lr", "recipe.lr"),
    ],
)
def test_a_recipe_outside_the_policy_is_refused_with_the_rule_named(
    policy: dict[str, Any], change: dict[str, Any], rule: str, key: str | None
) -> None:
    table = {"mode": "trusted", **policy}
    with pytest.raises(RecipeError) as refused:
        validate_recipe(dataclasses.replace(RECIPE, **change), TrainingPolicy.from_dict(table))
    assert refused.value.rule == rule and refused.value.key == key
    assert rule in str(refused.value)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"mode": "open"}, "training.mode"),
        ({"allowed_models": ["gpt"]}, "training.allowed_models"),
        ({"allowed_models": "small-cnn"}, "training.allowed_models"),
        ({"min_noise_multiplier": -1}, "training.min_noise_multiplier"),
        ({"min_noise_multiplier": float("nan")}, "training.min_noise_multiplier"),
        ({"max_local_epochs": 2.5}, "training.max_local_epochs"),
        ({"max_batch_size": True}, "training.max_batch_size"),
        ({"noise_floor": 1.0}, "training.noise_floor"),
    ],
)
def test_bad_policy_tables_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError, match=key.replace(".", r"\.")):
        TrainingPolicy.from_dict(table)


def test_the_demo_turns_a_policy_text_to_trusted_mode_keeping_everything_else() -> None:
    from fedgate.policy.model import default_policy_text, parse_policy
    from fedgate.training.policy import with_trusted_mode

    text = default_policy_text()
    trusted = parse_policy(with_trusted_mode(text), "t")
    original = parse_policy(text, "o")
    assert trusted.training.mode == "trusted" and original.training.mode == "gated"
    assert trusted.training.allowed_models == original.training.allowed_models
    assert trusted.noise_multiplier == original.noise_multiplier
    assert "# How this hospital takes part in training." in with_trusted_mode(text)  # comments kept
    assert parse_policy(with_trusted_mode(""), "e").training.mode == "trusted"
    assert parse_policy(with_trusted_mode("[training]\nmax_lr = 0.5\n"), "m").training.max_lr == 0.5


@pytest.mark.parametrize("mode", ["trusted", "both"])
def test_trusted_training_and_secagg_cannot_be_combined(mode: str) -> None:
    """SecAgg+'s collect stage runs the research team's ClientApp: with trusted training allowed,
    the policy is refused, and a Policy built in code gets no SecAgg+ handler."""
    import dataclasses

    from fedgate.errors import PolicyError
    from fedgate.policy.model import default_policy_text, parse_policy
    from fedgate.secagg.handler import handlers_for
    from fedgate.secagg.policy import with_secagg_table

    text = with_secagg_table(default_policy_text(), 5).replace('mode = "gated"', f'mode = "{mode}"', 1)
    with pytest.raises(PolicyError, match="cannot be combined"):
        parse_policy(text, "p")
    secagg = parse_policy(with_secagg_table(default_policy_text(), 5), "s")
    assert handlers_for(secagg, secagg.secagg)  # the control: gated mode gets its handler
    built = dataclasses.replace(secagg, training=TrainingPolicy(mode=mode))
    with pytest.raises(PolicyError):
        handlers_for(built, built.secagg)
