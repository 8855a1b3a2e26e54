"""The privacy event a recipe will cause, from the recipe and the dataset size alone.

The hospital computes ε from this plan, not from anything the training run reports; the
trainer runs exactly this plan (same sample rate, same number of steps), and a test holds it
to that."""

from __future__ import annotations

import math

from fedgate.privacy.events import DpSgdEvent
from fedgate.training.errors import RecipeError
from fedgate.training.recipe import Recipe


def planned_event(recipe: Recipe, num_examples: int) -> DpSgdEvent:
    """Poisson sample rate q = min(1, batch/n); ceil(n/batch) steps per local epoch (one
    expected pass over the data), so `local_epochs`·ceil(n/batch) steps in all."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise RecipeError("data.size", f"the hospital's training set must hold at least one image, got {num_examples}")
    sample_rate = min(1.0, recipe.batch_size / num_examples)
    steps = recipe.local_epochs * math.ceil(num_examples / recipe.batch_size)
    return DpSgdEvent(sample_rate=sample_rate, noise_multiplier=recipe.noise_multiplier, steps=steps)
