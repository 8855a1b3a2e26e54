"""A federation in this process, for fast tests: Flower's `Grid` delivering each message to a
hospital's executor entry point as bytes (as the simulation's relay does), hospitals with real
gates and ledgers and the SecAgg+ handler, and the ClientApp run in process (its own decoded
copy of the plain instruction) instead of in the sandbox. Everything the ClientApp was handed
is kept, to check what it saw."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedgate.executor.hospital import Hospital, HospitalConfig
from fedgate.flower_adapter import (
    SECAGG_CONFIGS,
    context_from_bytes,
    context_to_bytes,
    message_from_bytes,
    message_to_bytes,
    set_message_id,
)
from fedgate.gate.pipeline import AppOutcome
from fedgate.policy import Policy
from fedgate.secagg import SecAggPolicy
from fedgate.secagg.handler import handlers_for

FIRST_NODE = 1001
Drop = Callable[[str, int], bool]  # (stage, node id) -> drop that node's reply


class InProcessHospital(Hospital):
    """A real hospital (gate, ledger, handlers) whose ClientApp runs in this process: for tests only."""

    def __init__(self, config: HospitalConfig, app: ClientApp) -> None:
        super().__init__(config)
        self.app = app
        self.seen: list[tuple[bytes, bytes]] = []  # (instruction, context) as the ClientApp got them

    def sandboxed(
        self,
        instruction: bytes,
        context: bytes,
        run_id: int,
        app_source: Any,
        arrived: float | None = None,
        kind: str = "",
    ) -> tuple[AppOutcome, bytes | None]:
        self.seen.append((instruction, context))
        isolation = {"mode": "in-process-test", "enforced": False, "layers": []}
        try:
            reply = self.app(message_from_bytes(instruction), context_from_bytes(context))
        except Exception as err:
            return AppOutcome(None, f"{type(err).__name__}: {err}", "client-error", isolation), None
        return AppOutcome(message_to_bytes(reply), "", "", isolation), None


class HospitalGrid(Grid):
    """Flower's Grid over hospitals in this process, one node id per hospital."""

    def __init__(self, hospitals: list[Hospital], run_id: int, run_config: dict[str, Any], drop: Drop | None = None):
        self.hospitals = {FIRST_NODE + i: h for i, h in enumerate(hospitals)}
        self.partitions = {FIRST_NODE + i: i for i in range(len(hospitals))}
        self.run_config = run_config
        self.drop = drop or (lambda stage, node: False)
        self.traffic: list[tuple[str, int, bytes, bytes]] = []  # (stage, node, instruction, reply)
        self._run = Run.create_empty(run_id=run_id)
        self._pool = ThreadPoolExecutor(max(1, len(hospitals)))

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.hospitals)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("send_and_receive only")

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        set_message_id(message, message.object_id)  # as the SuperLink does on push
        raw = message_to_bytes(message)
        context = Context(run_id=message.metadata.run_id, node_id=node,
                          node_config={"partition-id": self.partitions[node], "num-partitions": len(self.hospitals)},
                          state=RecordDict(), run_config=dict(self.run_config))  # fmt: skip
        outgoing, _ = self.hospitals[node].run_task(raw, context_to_bytes(context))
        record = message.content.get(SECAGG_CONFIGS) if message.has_content() else None
        stage = str(record.get("stage", "?")) if record is not None else "plain"
        self.traffic.append((stage, node, raw, outgoing))
        return None if self.drop(stage, node) else message_from_bytes(outgoing)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._pool.map(self._deliver, list(messages)))
        return [reply for reply in replies if reply is not None]

    def close(self) -> None:
        self._pool.shutdown()
        for hospital in self.hospitals.values():
            hospital.close()


def federation(
    folder: Path,
    policy: Policy,
    secagg: SecAggPolicy,
    app: ClientApp,
    hospitals: int,
    run_id: int,
    run_config: dict[str, Any],
    drop: Drop | None = None,
) -> HospitalGrid:
    members: list[Hospital] = [
        InProcessHospital(
            HospitalConfig(name=f"hospital-{i}", folder=folder / f"hospital-{i}", policy=policy,
                           destination="test://secagg", handlers=handlers_for(policy, secagg)),
            app,
        )
        for i in range(hospitals)
    ]  # fmt: skip
    return HospitalGrid(members, run_id, run_config, drop)


def distributed(policy: Policy, honest: int) -> Policy:
    """The policy with distributed noise: each hospital adds sigma / sqrt(honest)."""
    return dataclasses.replace(policy, noise_mode="distributed", hospitals=honest)
