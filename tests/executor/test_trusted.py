"""Trusted mode at one hospital: a recipe trained by fedgate's own code in the hospital's
sandbox, on the hospital's own images; the reply through the gate with its ε recorded; every
problem with the recipe, the model or the budget refused on record before anything runs; and
no code of the research team's FAB installed or imported."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from PIL import Image

from conftest import NODE_ID, RUN_ID, policy_with
from fab.fab_builders import make_fab, reference_files
from fedgate.data.hospital import HospitalData
from fedgate.executor.hospital import Hospital, HospitalConfig
from fedgate.executor.node import NodeConfig, fab_source
from fedgate.executor.trusted import TRUSTED_APP, TRUSTED_PRELOAD, TrustedTraining, read_task
from fedgate.flower_adapter import context_to_bytes, make_instruction, message_from_bytes, message_to_bytes
from fedgate.gate.entries import ReplyEntry, read_entries
from fedgate.policy import Policy
from fedgate.policy.model import PrivacyPolicy
from fedgate.training import Recipe, build_model, recipe_to_config
from fedgate.training.policy import TrainingPolicy
from model_fixtures import tiny_model

RECIPE = Recipe(model="small-cnn", image_size=16, classes=2, optimizer="adam", lr=0.01, local_epochs=1,
                batch_size=8, max_grad_norm=1.0, noise_multiplier=1.0)  # fmt: skip
MARKER = "fab-code-ran"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital's images: two classes of 16x16 PNGs the sandbox's own uid may read."""
    root = tmp_path_factory.mktemp("hospital-images")
    rng = np.random.default_rng(0)
    for label, count in (("no", 30), ("yes", 30)):
        (root / label).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 120 if label == "no" else 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def trusted_policy(**training: Any) -> Policy:
    return policy_with(training=TrainingPolicy(**{"mode": "trusted", **training}))


@pytest.fixture
def hospital_for(tmp_path: Path, images: Path) -> Iterator[Callable[[Policy], Hospital]]:
    made: list[Hospital] = []

    def make(policy: Policy) -> Hospital:
        data = HospitalData(f"folder:{images}")
        hospital = Hospital(
            HospitalConfig(
                name="hospital-0", folder=tmp_path / f"hospital-{len(made)}", policy=policy, destination="test://server",
                data_dir=images, app=TRUSTED_APP, preload=TRUSTED_PRELOAD, handlers=(TrustedTraining(policy, data),),
            )
        )  # fmt: skip
        made.append(hospital)
        return hospital

    yield make
    for hospital in made:
        hospital.close()


@pytest.fixture(scope="module")
def trained_here(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Iterator[Hospital]:
    """One hospital in trusted mode whose sandbox lives for the module (as in a simulation)."""
    policy = trusted_policy()
    hospital = Hospital(
        HospitalConfig(
            name="hospital-0", folder=tmp_path_factory.mktemp("trusted") / "hospital-0", policy=policy,
            destination="test://server", data_dir=images, app=TRUSTED_APP, preload=TRUSTED_PRELOAD,
            handlers=(TrustedTraining(policy, HospitalData(f"folder:{images}")),),
        )
    )  # fmt: skip
    yield hospital
    hospital.close()


def zoo_arrays(recipe: Recipe = RECIPE) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.classes, recipe.image_size)
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def trusted_instruction(
    recipe: Recipe | None = RECIPE, arrays: dict[str, np.ndarray] | None = None, message_type: str = "train"
) -> bytes:
    config: dict[str, Any] = {"server-round": 1, **(recipe_to_config(recipe) if recipe else {})}
    tensors = zoo_arrays() if arrays is None else arrays
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}),
                          "config": ConfigRecord(config)})  # fmt: skip
    return message_to_bytes(make_instruction(content, message_type, dst_node_id=NODE_ID, run_id=RUN_ID))


def context() -> bytes:
    ctx = Context(run_id=RUN_ID, node_id=NODE_ID, node_config={"partition-id": 0, "num-partitions": 1},
                  state=RecordDict(), run_config={"dataset": "chosen-by-the-server"})  # fmt: skip
    return context_to_bytes(ctx)


def last_reply(hospital: Hospital) -> ReplyEntry:
    entries = hospital.call(lambda: read_entries(hospital.gate.ledger))
    return [e for e in entries if isinstance(e, ReplyEntry)][-1]


def test_a_recipe_is_trained_here_and_its_epsilon_recorded(trained_here: Hospital) -> None:
    hospital = trained_here
    outgoing, _ = hospital.run_task(trusted_instruction(), context())
    reply = message_from_bytes(outgoing)
    assert not reply.has_error()
    sent = reply.content["arrays"]
    assert list(sent.keys()) == list(zoo_arrays())  # the zoo model's tensors, under the instruction's record name
    entry = last_reply(hospital)
    assert entry.sent and entry.category == "train"
    assert entry.executor["trusted"]["recipe"]["recipe.model"] == "small-cnn"
    assert float(entry.executor["trusted"]["recipe"]["recipe.noise-multiplier"]) == RECIPE.noise_multiplier
    # 60 images, 10 % held out for validation: 54 train; q = 8/54, ceil(54/8) = 7 steps for one epoch
    planned = entry.executor["trusted"]["planned_dp_sgd"]
    assert float(planned["sample_rate"]) == pytest.approx(8 / 54) and planned["steps"] == 7
    record = entry.privacy["record_level"]
    epsilon = float(record["round"]["epsilon"])
    assert 0 < epsilon < float("inf") and record["round"] == record["cumulative"]  # the first round of this hospital
    assert record["round"]["accountant"] == "pld"
    assert entry.privacy["mode"] == "trusted"
    assert entry.executor["trusted"]["data"].startswith("folder:")
    [metrics] = [st["detail"]["metrics"] for st in entry.decision["stages"] if st["stage"] == "metrics"]
    assert metrics["train-loss"]["reported"] is False  # un-noised, it would leak outside ε: never reported


def test_evaluate_answers_on_the_local_validation_split(trained_here: Hospital) -> None:
    hospital = trained_here
    outgoing, _ = hospital.run_task(trusted_instruction(message_type="evaluate"), context())
    reply = message_from_bytes(outgoing)
    assert not reply.has_error()
    assert set(reply.content["metrics"].keys()) >= {"eval-loss", "eval-acc"}
    assert last_reply(hospital).sent


@pytest.mark.parametrize(
    ("recipe", "arrays", "rule"),
    [
        (dataclasses.replace(RECIPE, noise_multiplier=0.1), None, "training.min_noise_multiplier"),
        (dataclasses.replace(RECIPE, model="resnet18-gn"), None, "training.allowed_models"),
        (dataclasses.replace(RECIPE, local_epochs=50), None, "training.max_local_epochs"),
        (dataclasses.replace(RECIPE, classes=20), None, "training.max_classes"),
        (RECIPE, tiny_model(), "manifest"),  # the arrays are not the recipe's model
        (dataclasses.replace(RECIPE, classes=3), None, "manifest"),
        (None, None, "recipe"),  # trusted mode: an instruction without a recipe is not trained here
    ],
)
def test_what_the_policy_or_the_model_forbids_is_refused_before_anything_runs(
    hospital_for: Callable[[Policy], Hospital],
    recipe: Recipe | None,
    arrays: dict[str, np.ndarray] | None,
    rule: str,
) -> None:
    hospital = hospital_for(trusted_policy())
    outgoing, _ = hospital.run_task(trusted_instruction(recipe, arrays), context())
    assert message_from_bytes(outgoing).has_error()
    entry = last_reply(hospital)
    assert not entry.sent and entry.rule == rule
    assert hospital._worker is None  # no sandbox was started: nothing ran


def test_the_privacy_budget_refuses_the_round_before_it_trains(hospital_for: Callable[[Policy], Hospital]) -> None:
    policy = dataclasses.replace(trusted_policy(), privacy=PrivacyPolicy(max_epsilon=0.5))
    hospital = hospital_for(policy)
    outgoing, _ = hospital.run_task(trusted_instruction(), context())
    assert message_from_bytes(outgoing).has_error()
    entry = last_reply(hospital)
    assert entry.rule == "privacy.max_epsilon" and hospital._worker is None
    assert entry.privacy == {}  # nothing was spent


def test_a_duplicated_recipe_key_is_refused() -> None:
    config = recipe_to_config(RECIPE)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in zoo_arrays().items()}),
                          "config": ConfigRecord(config), "more": ConfigRecord({"recipe.lr": 0.5})})  # fmt: skip
    raw = message_to_bytes(make_instruction(content, "train", dst_node_id=NODE_ID, run_id=RUN_ID))
    with pytest.raises(Exception, match="two config records"):
        read_task(raw)


def _marking_fab() -> bytes:
    """The reference app, whose ClientApp module leaves a marker in the app cache (which the node
    keeps between tasks) the moment it is imported."""
    files = reference_files()
    module = "fedgate_medical/client_app.py"
    files[module] += (
        b"\nimport os as _os, pathlib as _pathlib\n"
        b"_pathlib.Path(_os.environ.get('FEDGATE_CACHE', '/cache'), '" + MARKER.encode() + b"').write_text('x')\n"
    )
    return make_fab(files)


@pytest.mark.parametrize("mode", ["trusted", "gated"])
def test_no_code_of_the_fab_is_installed_or_imported_in_trusted_mode(tmp_path: Path, images: Path, mode: str) -> None:
    """The node's FAB intake is the app source; in trusted mode it is never asked. The gated run
    is the control: the same FAB is installed and its module runs (the marker appears)."""
    policy = policy_with(training=TrainingPolicy(mode=mode))
    folder = tmp_path / "hospital"
    node = NodeConfig(runtime_api_address="", hospital_dir=folder, data_dir=images, policy=policy, destination="t://")
    asked: list[bool] = []
    install = fab_source(node, _marking_fab(), "")

    def source() -> Any:
        asked.append(True)
        return install()

    hospital = Hospital(
        HospitalConfig(
            name="hospital-0", folder=folder, policy=policy, destination="test://server", data_dir=images,
            keep_worker=False, keep_state=False, masks=(folder,),
            handlers=(TrustedTraining(policy, HospitalData(f"folder:{images}")),),
        )
    )  # fmt: skip
    try:
        # trusted: an evaluate instruction (the quickest task with a recipe); the gate and the FAB
        # intake treat it as they treat a train instruction
        ins = trusted_instruction(message_type="evaluate") if mode == "trusted" else _reference_instruction()
        hospital.run_task(ins, context(), app_source=source)
    finally:
        hospital.close()
    markers = list(folder.rglob(MARKER))
    fabs = folder / "fabs"
    if mode == "trusted":
        assert not asked and not markers and not (fabs.exists() and any(fabs.iterdir()))
    else:
        assert asked and markers, "the control: in gated mode the FAB is installed and its code runs"


def _reference_instruction() -> bytes:
    """A gated train instruction for the reference app (its own model, no recipe)."""
    from fedgate_medical.models import build_model as app_model

    torch.manual_seed(0)
    tensors = {k: v.detach().numpy().copy() for k, v in app_model("cnn", 2, 16).state_dict().items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}),
                          "config": ConfigRecord({"server-round": 1})})  # fmt: skip
    return message_to_bytes(make_instruction(content, "train", dst_node_id=NODE_ID, run_id=RUN_ID))


def test_the_trusted_app_never_sees_the_servers_run_config(images: Path) -> None:
    """What the trusted app trains on comes from the hospital's HospitalData alone."""
    handler = TrustedTraining(trusted_policy(), HospitalData(f"folder:{images}"))
    from fedgate.flower_adapter import context_from_bytes

    given = context_from_bytes(handler._context(context()))
    assert dict(given.run_config) == {}
    assert set(given.node_config) == {"fedgate.hospital-data"}
    assert os.fspath(images) in str(given.node_config["fedgate.hospital-data"])


@pytest.mark.slow
def test_a_trusted_federation_in_simulation(tmp_path: Path) -> None:
    """`fedgate demo --trusted`'s path, small: the reference ServerApp sends a recipe with stock
    FedAvg, both hospitals train it with fedgate's trainer, and the summary states their ε."""
    from fedgate.executor.simulation import RunSpec, run_federation

    spec = RunSpec(
        client_app="fedgate_medical.client_app:app", server_app="fedgate_medical.server_app_trusted:app",
        hospitals=2, rounds=1, out_dir=tmp_path / "run", policy=trusted_policy(),
        run_config={"subset": 300, "image-size": 32},
    )  # fmt: skip
    summary = run_federation(spec)
    assert summary["training_mode"] == "trusted" and not summary["refusals"]
    assert summary["final_accuracy"] is not None
    for name in ("hospital-0", "hospital-1"):
        epsilon = summary["epsilon"][name]
        assert epsilon["record_level"] is not None and 0 < epsilon["record_level"] < 50
        assert epsilon["accountant"].startswith("record: pld")
        assert summary["egress"][name]["replies_sent"] == 2  # one train, one evaluate


def test_training_refuses_a_train_set_other_than_the_one_accounted_for(tmp_path: Path) -> None:
    """The hospital plans ε from the size of its training set; the sandbox loads the data again.
    If what it finds differs (images removed between the two loads), it trains nothing."""
    import shutil

    folder = tmp_path / "images"
    rng = np.random.default_rng(1)
    for label in ("no", "yes"):
        (folder / label).mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / label / f"{i}.png")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    policy = trusted_policy()
    data = HospitalData(f"folder:{folder}")
    data.load(16)  # the hospital's side has read (and keeps) the 60 images
    for path in sorted((folder / "yes").iterdir())[:20]:
        path.unlink()
    shutil.rmtree(folder / "no" / "0.png", ignore_errors=True)
    hospital = Hospital(
        HospitalConfig(
            name="hospital-0",
            folder=tmp_path / "h",
            policy=policy,
            destination="test://server",
            data_dir=folder,
            app=TRUSTED_APP,
            handlers=(TrustedTraining(policy, data),),
        )
    )
    try:
        outgoing, _ = hospital.run_task(trusted_instruction(), context())
        assert message_from_bytes(outgoing).has_error()
        entry = last_reply(hospital)
    finally:
        hospital.close()
    assert not entry.sent and "not the one accounted for" in entry.reason
    assert entry.executor["trusted"]["train_set"]["num_examples"] == 54
