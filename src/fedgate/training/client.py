"""The trusted-mode ClientApp: fedgate's own code, never the research team's.

The hospital's executor runs this app (in the hospital's sandbox, like any ClientApp: defence in
depth against the server's bytes) only after it has parsed the recipe, checked it against the
`[training]` policy and the instruction's arrays against the zoo model's manifest, and accounted
the DP-SGD it will run. What this app trains on comes from the hospital's configuration, carried
in the node config under `NODE_CONFIG_KEY`; the server's run config is never read.

Train: DP-SGD (`train_dp`) from the received weights on the hospital's training split; the reply
holds the trained arrays under the instruction's own record name and `num-examples` (never the
training loss: un-noised, it would leak outside ε). Evaluate: loss and accuracy on the local
validation split (10 % of the share)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgate.data.hospital import EXPECTED_KEY, NODE_CONFIG_KEY, HospitalData
from fedgate.data.loaders import ImageSet
from fedgate.training.errors import RecipeError
from fedgate.training.networks import FixedFeatureNetwork
from fedgate.training.recipe import Recipe
from fedgate.training.trainer import fixed_features, model_input, train_dp
from fedgate.training.zoo import build_model, check_arrays

app = ClientApp()


def recipe_of(msg: Message) -> Recipe:
    """The recipe from the instruction's config records (one record may carry it: two that both
    do would leave the choice to us, so that is refused)."""
    found: dict[str, Any] = {}
    for record in msg.content.values():
        if isinstance(record, ConfigRecord):
            for key, value in record.items():
                if key.startswith("recipe.") and key in found:
                    raise RecipeError("recipe.duplicate", f"{key} appears in two config records", key=key)
                found[key] = value
    return Recipe.from_config(found)


def model_of(msg: Message) -> tuple[str, dict[str, np.ndarray]]:
    arrays = [(name, record) for name, record in msg.content.items() if isinstance(record, ArrayRecord)]
    if len(arrays) != 1:
        raise RecipeError("manifest", f"the instruction must carry exactly one ArrayRecord, it has {len(arrays)}")
    name, record = arrays[0]
    return name, {key: array.numpy() for key, array in record.items()}


def hospital_data(context: Context) -> HospitalData:
    return HospitalData.from_json(json.loads(str(context.node_config[NODE_CONFIG_KEY])))


def check_expected(context: Context, train_set: ImageSet) -> None:
    """Train only on the very set the hospital accounted for (its size sets q and the steps)."""
    raw = context.node_config.get(EXPECTED_KEY)
    if raw is None:
        raise RecipeError("data.expected", "the hospital did not say which training set it accounted for")
    expected = json.loads(str(raw))
    found = {"num_examples": len(train_set), "sha256": train_set.digest()}
    if found != expected:
        raise RecipeError(
            "data.changed",
            f"the training set is not the one accounted for ({found['num_examples']} images here, "
            f"{expected.get('num_examples')} accounted): nothing was trained",
        )


def _array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((key, Array(np.ascontiguousarray(value))) for key, value in arrays.items()))


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    recipe = recipe_of(msg)
    name, arrays = model_of(msg)
    train_set, _ = hospital_data(context).load(recipe.image_size)
    check_expected(context, train_set)
    # secure_mode: each noise coordinate is a sum of four Gaussian draws, against attacks on the
    # floating-point form of one draw; measured: no visible cost for the small CNN.
    result = train_dp(recipe, train_set, arrays, secure_mode=True)
    # No training loss: it is computed from the training images without noise, so it would leave
    # outside the DP-SGD guarantee (the gate sends the policy's floor value in its place).
    metrics = MetricRecord({"num-examples": result.num_examples})
    return Message(RecordDict({name: _array_record(result.arrays), "metrics": metrics}), reply_to=msg)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties averaged); NaN when one class is absent."""
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # the average 1-based rank of each tie group
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def evaluate_model(recipe: Recipe, arrays: dict[str, np.ndarray], data: ImageSet) -> tuple[float, float, float]:
    """(mean cross-entropy, accuracy, AUC) of the recipe's model with `arrays` on `data`; the
    AUC is for class 1 against the rest (NaN unless the data holds both)."""
    check_arrays(recipe.model, recipe.classes, recipe.image_size, arrays)
    model = build_model(recipe.model, recipe.classes, recipe.image_size)
    model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()})
    model.eval()
    if isinstance(model, FixedFeatureNetwork):
        logits = model.head(fixed_features(model, data.images))
    else:
        images = model_input(data.images)
        logits = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
    labels = torch.from_numpy(data.labels).long()
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(1) == labels).float().mean())
    probs = torch.softmax(logits, dim=1)[:, 1].numpy()
    return loss, accuracy, binary_auc(probs, data.labels == 1)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    recipe = recipe_of(msg)
    _, arrays = model_of(msg)
    _, val_set = hospital_data(context).load(recipe.image_size)
    loss, accuracy, _ = evaluate_model(recipe, arrays, val_set)
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": accuracy, "num-examples": len(val_set)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
