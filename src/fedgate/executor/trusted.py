"""Trusted mode, the hospital's side: a train or evaluate instruction carrying a recipe is
answered by fedgate's own trainer, and no code of the research team runs (in deployment the
FAB is never installed, let alone imported).

Before anything runs, on the hospital's side of the sandbox: the recipe is parsed strictly and
held to the `[training]` policy, the instruction's arrays to the zoo model's manifest, and the
DP-SGD it will run (`planned_event`, from the recipe and the size of the hospital's own data)
is accounted by the gate, which refuses it when it would pass `[privacy] max_epsilon`. Any of
these failing is a recorded refusal naming the rule; the server gets the generic error.

Then `fedgate.training.client:app` runs in the hospital's sandbox (fedgate's code, but the
weights and recipe are the server's bytes: defence in depth), on the data the hospital chose
(`HospitalData`, handed over in the node config; never the recipe's or the run config's
choice), and its reply passes the same gate, clip, noise and ledger as a gated reply."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from fedgate.canonical import decimal_str
from fedgate.data.hospital import EXPECTED_KEY, NODE_CONFIG_KEY, HospitalData
from fedgate.errors import GateRefusal
from fedgate.executor.audit_data import share_of
from fedgate.executor.hospital import AppSource, Hospital, Outgoing
from fedgate.flower_adapter import context_from_bytes, context_to_bytes
from fedgate.gate.codec import parse_message
from fedgate.gate.decode import decode_record
from fedgate.policy import Policy
from fedgate.privacy.events import DpSgdEvent
from fedgate.sandbox.runner import AppRef
from fedgate.training.errors import RecipeError
from fedgate.training.policy import validate_recipe
from fedgate.training.recipe import PREFIX, Recipe, recipe_to_config

TRUSTED_APP = AppRef("fedgate.training.client:app", ())
TRUSTED_PRELOAD: tuple[str, ...] = ("numpy", "torch")


def simulated_hospital_data(policy: Policy, run_config: Mapping[str, Any], index: int, hospitals: int) -> HospitalData:
    """What simulated hospital `index` of `hospitals` trains on in trusted mode: the policy's
    `[training] dataset` when set, else its share of the run's dataset, split as the reference
    app splits it (the run config's dataset, image-size, subset, partition, alpha, test-fraction
    and seed keys, with the reference app's defaults). The operator chooses these on the command
    line of `fedgate run`/`demo`; the recipe cannot."""
    if policy.training.dataset:
        return HospitalData(policy.training.dataset)
    share = share_of(run_config)  # the same derivation the [audit] stage uses for its images
    return HospitalData(share.dataset, share, index, hospitals)


@dataclass(frozen=True)
class TrustedTask:
    """What the hospital read from the instruction, before anything ran."""

    category: str
    recipe: Recipe
    arrays: dict[str, np.ndarray]
    expected: dict[str, Any] = dataclasses.field(default_factory=dict)  # the train set the plan was made for


def recipe_keys(raw: bytes) -> tuple[str, dict[str, Any]]:
    """(message type, the `recipe.*` keys of its config records). A key in two records is
    refused: which one counts would be our guess."""
    wire = parse_message(raw)
    found: dict[str, Any] = {}
    for record in wire.records("config").values():
        for key, value in record.items:
            if key.startswith(PREFIX):
                if key in found:
                    raise RecipeError("recipe.duplicate", f"{key} appears in two config records", key=key)
                found[key] = value
    return wire.metadata.message_type, found


def read_task(raw: bytes) -> TrustedTask:
    """The recipe and the model of a trusted instruction; RecipeError names what is wrong."""
    message_type, keys = recipe_keys(raw)
    recipe = Recipe.from_config(keys)
    arrays_records = parse_message(raw).records("array")
    if len(arrays_records) != 1:
        count = len(arrays_records)
        raise RecipeError("manifest", f"a trusted instruction carries exactly one ArrayRecord, it has {count}")
    try:
        arrays = dict(decode_record(next(iter(arrays_records.values()))))
    except GateRefusal as err:
        raise RecipeError("manifest", f"the server's model: {err}") from err
    return TrustedTask(message_type.split(".", 1)[0], recipe, arrays)


@dataclass(frozen=True)
class TrustedTraining:
    """The `InstructionHandler` for trusted mode: every instruction when `[training] mode` is
    "trusted"; with "both", those that carry `recipe.*` keys (the rest go to the ClientApp)."""

    policy: Policy
    data: HospitalData

    def handles(self, instruction: bytes) -> bool:
        mode = self.policy.training.mode
        if mode == "trusted":
            return True
        if mode != "both":
            return False
        try:
            return bool(recipe_keys(instruction)[1])
        except Exception:  # unreadable, or a duplicated key: a recipe was meant, so it is ours to refuse
            return _mentions_recipe(instruction)

    def run(
        self, hospital: Hospital, instruction: bytes, context: bytes, arrived: float, app_source: AppSource | None
    ) -> tuple[Outgoing, bytes | None]:
        del app_source  # the research team's app (the node's FAB intake) is never asked for
        gate = hospital.gate
        if gate.state().halted:  # refused anyway: no data is read, no network built
            task, problem, planned = None, None, None
        else:
            task, problem, planned = self._check(instruction)
        admission = gate.admit(instruction, arrived, dp_sgd=planned)
        if admission.refusal is None and problem is not None:
            admission = dataclasses.replace(admission, refusal=problem)
        outcome = None
        if admission.refusal is None:
            assert task is not None
            planned_json = None if planned is None else {k: _plain(v) for k, v in dataclasses.asdict(planned).items()}
            evidence = {
                "trusted": {
                    "app": TRUSTED_APP.reference,
                    "recipe": {k: _plain(v) for k, v in recipe_to_config(task.recipe).items()},
                    "data": self.data.describe(),
                    "planned_dp_sgd": planned_json,
                    "train_set": task.expected or None,
                }
            }

            def source() -> tuple[AppRef, dict[str, Any]]:
                return TRUSTED_APP, evidence

            ctx = self._context(context, task.expected)
            outcome, _ = hospital.sandboxed(instruction, ctx, admission.run_id, source, arrived,
                                            kind=admission.message_type)  # fmt: skip
        return hospital._send(gate.conclude(admission, outcome), instruction), None

    def _check(self, instruction: bytes) -> tuple[TrustedTask | None, GateRefusal | None, DpSgdEvent | None]:
        """Everything decided before any code runs. A problem is returned, not raised: the gate
        admits first (so an instruction it refuses anyway is refused for its own reason)."""
        from fedgate.training.plan import planned_event
        from fedgate.training.zoo import check_arrays  # torch: only when a trusted task arrives

        try:
            task = read_task(instruction)
            validate_recipe(task.recipe, self.policy.training)
            check_arrays(task.recipe.model, task.recipe.classes, task.recipe.image_size, task.arrays)
        except RecipeError as err:
            return None, as_refusal(err), None
        except Exception as err:  # unreadable bytes: refused on record (the gate names its own reason first)
            return None, GateRefusal("recipe", f"{type(err).__name__}: {err}"[:500]), None
        if task.category != "train":
            return task, None, None
        try:
            train, _ = self.data.load(task.recipe.image_size)
            # The sandbox loads the data again: it trains only if it finds exactly this set, so what
            # is accounted (n, hence q and the steps) is what trains.
            expected = {"num_examples": len(train), "sha256": train.digest()}
            return dataclasses.replace(task, expected=expected), None, planned_event(task.recipe, len(train))
        except RecipeError as err:
            return None, as_refusal(err), None
        except Exception as err:
            return None, GateRefusal("data", f"the hospital's data: {type(err).__name__}: {err}"[:500]), None

    def _context(self, context: bytes, expected: dict[str, Any] | None = None) -> bytes:
        """The trusted app's context: the ids, and the hospital's own data choice. Nothing of the
        server's run config or node config reaches it."""
        given = context_from_bytes(context)
        node_config: dict[str, Any] = {NODE_CONFIG_KEY: json.dumps(self.data.to_json(), sort_keys=True)}
        if expected:
            node_config[EXPECTED_KEY] = json.dumps(expected, sort_keys=True)
        ctx = Context(run_id=given.run_id, node_id=given.node_id, node_config=node_config,  # type: ignore[arg-type]
                      state=RecordDict(), run_config={})  # fmt: skip
        return context_to_bytes(ctx)


def as_refusal(err: RecipeError) -> GateRefusal:
    """The trainer's refusal as the gate records it: same rule, the key and values as text."""
    message = str(err).removeprefix(f"[{err.rule}] ")[:500]
    detail = {name: str(_plain(value))[:200] for name, value in err.detail.items()}
    if err.key is not None:
        detail["key"] = err.key
    return GateRefusal(err.rule, message, **detail)


def _plain(value: Any) -> Any:
    """A value for the ledger's canonical JSON: floats as exact decimal text."""
    return decimal_str(value) if isinstance(value, float) else value


def _mentions_recipe(instruction: bytes) -> bool:
    return PREFIX.encode() in instruction
