"""Shared helpers: Flower messages built the way the SuperLink delivers them, and a gate that
releases without waiting (tests set tiny release slots; the slot logic has its own tests)."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedgate.flower_adapter import make_instruction, message_from_bytes, message_to_bytes
from fedgate.gate.pipeline import AppOutcome, GatePipeline, Outcome
from fedgate.policy import Policy, load_policy
from fedgate.policy.model import ReleasePolicy
from malicious_apps import ATTACK_RULES, SOME_ATTACKS
from model_fixtures import array_record, tiny_model

# The attacks an end-to-end test plays, in both executors: one per refusal path in `make test`,
# every attack at once in `make slow`.
ATTACK_SETS = [
    pytest.param(SOME_ATTACKS, id="one-per-path"),
    pytest.param(list(ATTACK_RULES), id="every-attack", marks=pytest.mark.slow),
]

RUN_ID = 4242
NODE_ID = 17
FAST_RELEASE = ReleasePolicy(slot_s=0.005, max_slots=1 << 20)


def instruction(
    message_type: str = "train",
    server_round: object = 1,
    tensors: dict[str, np.ndarray] | None = None,
    run_id: int = RUN_ID,
    created_at: float | None = None,
) -> Message:
    """A fresh instruction; with `created_at` fixed, the same bytes every time (a task the
    SuperNode delivers again after a node restart is the same message)."""
    records: dict[str, object] = {"config": ConfigRecord({"server-round": server_round})}  # type: ignore[dict-item]
    if message_type != "query":
        records["arrays"] = array_record(tensors or tiny_model())
    return make_instruction(RecordDict(records), message_type, dst_node_id=NODE_ID, run_id=run_id,  # type: ignore[arg-type]
                            created_at=created_at)  # fmt: skip


def policy_with(**changes: object) -> Policy:
    """The shipped default policy with some settings changed (and fast release slots)."""
    changes.setdefault("release", FAST_RELEASE)
    return dataclasses.replace(load_policy(None), **changes)  # type: ignore[arg-type]


def gate_for(folder: Path, **changes: object) -> GatePipeline:
    return GatePipeline(policy_with(**changes), folder / "hospital-0", "hospital-0", "test://server")


def through_gate(
    gate: GatePipeline, ins: Message, app: Callable[[Message], Message] | Exception | bytes | None
) -> Outcome:
    """One instruction through the seam as an executor passes it: bytes in, bytes out."""
    raw = message_to_bytes(ins)
    admission = gate.admit(raw)
    outcome = None
    if admission.refusal is None:
        if isinstance(app, bytes) or app is None:
            outcome = AppOutcome(app, "" if app is not None else "no reply", "" if app is not None else "client-error")
        elif isinstance(app, Exception):
            outcome = AppOutcome(None, f"{type(app).__name__}: {app}", "client-error")
        else:
            try:
                outcome = AppOutcome(message_to_bytes(app(message_from_bytes(raw))))  # its own copy
            except Exception as err:
                outcome = AppOutcome(None, f"{type(err).__name__}: {err}", "client-error")
    return gate.conclude(admission, outcome)


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = RUN_ID, 1, 1
    yield


@pytest.fixture(autouse=True)
def _remove_noise_when_asked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """FEDGATE_TESTS_REMOVE_NOISE=1 (set only by tests/gate/test_guarantees_need_the_noise.py)
    replaces every noise draw with zero, to show that the guarantee tests then fail."""
    if os.environ.get("FEDGATE_TESTS_REMOVE_NOISE") == "1":
        from fedgate.gate.noise import NoiseSource

        def zeros(self: NoiseSource, stream: int, block: int, count: int, scale: float, out: np.ndarray) -> None:
            out[:count] = 0

        monkeypatch.setattr(NoiseSource, "integer_gaussian", zeros)
    yield
