"""The research team's side of fedgate's SecAgg+: Flower's `SecAggPlusWorkflow`, with the masked
sum computed the way the hospitals' gates mask, and a round that cannot be unmasked raising.

    workflow = DefaultWorkflow(fit_workflow=GateSecAggPlusWorkflow(num_shares=5, reconstruction_threshold=3))
    workflow(grid, LegacyContext(context, config=ServerConfig(num_rounds=3), strategy=FedAvg(...)))

Flower's setup and share-keys stages run unchanged (the setup message also names fedgate's
protocol: ChaCha20 masks under 256-bit seeds, integers mod 2^64 on a 2^step_log2 grid). The
collect and unmask stages are Flower's with three changes:
  - masks are removed with ChaCha20 (`fedgate.secagg.masks`), not MT19937 from a 32-bit seed;
  - the sum is of the hospitals' released updates (`fedgate.secagg.encoding`): the new model is
    the global model plus their mean, every hospital weighing the same; the strategy's
    `aggregate_fit` gets that model in every result, so a stock FedAvg passes it on;
  - dropped hospitals are those whose key shares went out but whose masked vector did not
    come back (Flower's counts one that dropped even earlier, and then cannot unmask).
Too few survivors at any stage raises `SecAggRoundFailed`, which stops the ServerApp and shows
in the run's output (Flower's logs a line and leaves the model silently unchanged)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedgate.errors import FedgateError
from fedgate.flower_adapter import (
    SECAGG_CONFIGS,
    LegacyServer,
    SecAggKey,
    SecAggStage,
    combine_shares,
    shared_key,
)
from fedgate.secagg import masks
from fedgate.secagg.encoding import DEFAULT_STEP_LOG2, MODULUS_BITS, STEP_LOG2_RANGE, decode_mean
from fedgate.secagg.protocol import KEY_MODULUS, KEY_PRG, KEY_PROTOCOL, KEY_STEP, PROTOCOL

log = logging.getLogger("fedgate.secagg")
_FLOWER = LegacyServer()
TRAIN = "train"


class SecAggRoundFailed(FedgateError):
    """A secure-aggregation round could not be completed (too few hospitals left at some stage):
    the round has no aggregate, and the run stops rather than keep the old model silently."""


class _ProtocolGrid(Grid):
    """The ServerApp's grid, with fedgate's protocol named in every setup message."""

    def __init__(self, grid: Grid, protocol: dict[str, Any]) -> None:
        self._grid = grid
        self._protocol = protocol

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def _tag(self, messages: Iterable[Message]) -> list[Message]:
        tagged = list(messages)
        for message in tagged:
            record = message.content.get(SECAGG_CONFIGS) if message.has_content() else None
            if isinstance(record, ConfigRecord) and record.get(SecAggKey.STAGE) == SecAggStage.SETUP:
                record.update(self._protocol)
        return tagged

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._tag(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(self._tag(messages), timeout=timeout)


_FlowerWorkflow: Any = _FLOWER.SecAggPlusWorkflow


class GateSecAggPlusWorkflow(_FlowerWorkflow):  # type: ignore[misc]
    """Flower's SecAgg+ workflow for hospitals whose gates run the client side (`fedgate.secagg`)."""

    def __init__(
        self,
        num_shares: int | float,
        reconstruction_threshold: int | float,
        *,
        step_log2: int = DEFAULT_STEP_LOG2,
        timeout: float | None = None,
    ) -> None:
        super().__init__(num_shares, reconstruction_threshold, timeout=timeout)
        if not STEP_LOG2_RANGE[0] <= step_log2 <= STEP_LOG2_RANGE[1]:
            raise ValueError(f"step_log2 must be in {STEP_LOG2_RANGE}, got {step_log2}")
        self.step_log2 = step_log2
        self.rounds: list[dict[str, Any]] = []  # per round: who was summed, who dropped

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, _FLOWER.LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        state = _FLOWER.WorkflowState()
        protocol = {KEY_PROTOCOL: PROTOCOL, KEY_PRG: masks.PRG, KEY_STEP: self.step_log2, KEY_MODULUS: MODULUS_BITS}
        tagged = _ProtocolGrid(grid, protocol)
        stages = (
            ("setup", self.setup_stage),
            ("share keys", self.share_keys_stage),
            ("collect masked vectors", self.collect_masked_vectors_stage),
            ("unmask", self.unmask_stage),
        )
        current = context.state.config_records[_FLOWER.MAIN_CONFIGS_RECORD][_FLOWER.CURRENT_ROUND]
        seconds: dict[str, float] = {}
        for name, stage in stages:
            started = time.perf_counter()
            done = stage(tagged, context, state)
            seconds[name] = round(time.perf_counter() - started, 4)
            if not done:
                survivors = len(state.active_node_ids)
                raise SecAggRoundFailed(
                    f"secure aggregation round {current} failed at the {name} stage: {survivors} of "
                    f"{len(state.sampled_node_ids)} hospitals left, and every sum needs at least {state.threshold} "
                    f"(the reconstruction threshold); {len(state.failures)} replies were errors or refusals"
                )
        self.rounds[-1]["seconds"] = seconds  # where the round's time went, stage by stage

    def collect_masked_vectors_stage(self, grid: Grid, context: Context, state: Any) -> bool:
        """Forward the key shares with the fit instruction; add up the masked vectors mod 2^64."""
        legacy: Any = context
        current = legacy.state.config_records[_FLOWER.MAIN_CONFIGS_RECORD][_FLOWER.CURRENT_ROUND]
        state.shared_node_ids = set(state.active_node_ids)  # whose shares went out: the ones to unmask

        def make(nid: int) -> Message:
            content = state.nid_to_fitins[nid]
            content.config_records[SECAGG_CONFIGS] = ConfigRecord(
                {
                    SecAggKey.STAGE: SecAggStage.COLLECT_MASKED_VECTORS,
                    SecAggKey.CIPHERTEXT_LIST: state.forward_ciphertexts[nid],
                    SecAggKey.SOURCE_LIST: state.forward_srcs[nid],
                }
            )
            return Message(content=content, dst_node_id=nid, message_type=TRAIN, group_id=str(current))

        replies = grid.send_and_receive([make(nid) for nid in state.active_node_ids], timeout=self.timeout)
        del state.forward_ciphertexts, state.forward_srcs, state.nid_to_fitins
        length = sum(int(t.size) for t in _global_model(legacy) if t.dtype.kind == "f")
        total = np.zeros(length, dtype=np.uint64)
        summed: set[int] = set()
        for reply in replies:
            if reply.has_error():
                state.failures.append(Exception(reply.error))
                continue
            node = reply.metadata.src_node_id
            try:
                vector = _masked_vector(reply, length)
                fitres = _FLOWER.recorddict_to_fitres(reply.content, True)
            except (KeyError, TypeError, ValueError) as err:
                state.failures.append(err)
                continue
            np.add(total, vector, out=total)  # mod 2^64
            state.legacy_results.append((state.nid_to_proxies[node], fitres))
            summed.add(node)
        state.active_node_ids = summed
        state.aggregate_ndarrays = [total]
        return bool(self._check_threshold(state))

    def unmask_stage(self, grid: Grid, context: Context, state: Any) -> bool:
        """Reconstruct each survivor's mask seed and each dropped hospital's first key from the
        survivors' shares, remove the masks, and hand the mean to the strategy."""
        legacy: Any = context
        current = cast(int, legacy.state.config_records[_FLOWER.MAIN_CONFIGS_RECORD][_FLOWER.CURRENT_ROUND])
        active: set[int] = set(state.active_node_ids)
        dead: set[int] = set(state.shared_node_ids) - active

        def make(nid: int) -> Message:
            neighbours = state.nid_to_neighbours[nid]
            record = ConfigRecord(
                {
                    SecAggKey.STAGE: SecAggStage.UNMASK,
                    SecAggKey.ACTIVE_NODE_ID_LIST: sorted(neighbours & active),
                    SecAggKey.DEAD_NODE_ID_LIST: sorted(neighbours & dead),
                }
            )
            return Message(RecordDict({SECAGG_CONFIGS: record}), dst_node_id=nid, message_type=TRAIN,
                           group_id=str(current))  # fmt: skip

        replies = grid.send_and_receive([make(nid) for nid in active], timeout=self.timeout)
        shares: dict[int, list[bytes]] = {nid: [] for nid in active | dead}
        for reply in replies:
            if reply.has_error():
                state.failures.append(Exception(reply.error))
                continue
            try:
                answered = _unmask_answer(reply)
            except (KeyError, TypeError, ValueError) as err:  # a malformed answer counts as none
                state.failures.append(err)
                continue
            for owner, share in answered:
                if owner in shares:
                    shares[owner].append(share)
        short = sorted(nid for nid, got in shares.items() if len(got) < state.threshold)
        if short:
            log.error("SecAgg+: too few shares to unmask nodes %s", short)
            state.active_node_ids = {r.metadata.src_node_id for r in replies if not r.has_error()}
            return False
        total = state.aggregate_ndarrays[0]
        length = int(total.size)
        for nid, got in shares.items():
            secret = combine_shares(got)
            if nid in active:
                np.subtract(total, masks.private_mask(secret, length), out=total)
                continue
            for other in state.nid_to_neighbours[nid] & active:
                pairwise = masks.pairwise_mask(shared_key(secret, state.nid_to_publickeys[other][0]), length)
                masks.apply_pairwise(total, nid, other, pairwise)  # undo what `other` added for `nid`
        model = decode_mean(total, len(active), self.step_log2, _global_model(legacy))
        parameters = _FLOWER.ndarrays_to_parameters(model)
        for _, fitres in state.legacy_results:
            fitres.parameters = parameters
        self.rounds.append({"round": current, "summed": sorted(active), "dropped": sorted(dead)})
        log.info("SecAgg+ round %s: %s hospitals in the sum, %s dropped", current, len(active), len(dead))
        aggregated, metrics = legacy.strategy.aggregate_fit(current, state.legacy_results, state.failures)
        if aggregated is None:
            return False
        legacy.state.array_records[_FLOWER.MAIN_PARAMS_RECORD] = _FLOWER.parameters_to_arrayrecord(aggregated)
        legacy.history.add_metrics_distributed_fit(server_round=current, metrics=metrics)
        return True


def _global_model(context: Any) -> list[np.ndarray]:
    record = context.state.array_records[_FLOWER.MAIN_PARAMS_RECORD]
    return list(_FLOWER.parameters_to_ndarrays(_FLOWER.arrayrecord_to_parameters(record, keep_input=True)))


def _unmask_answer(reply: Message) -> list[tuple[int, bytes]]:
    record = reply.content.config_records[SECAGG_CONFIGS]
    owners, shares = record[SecAggKey.NODE_ID_LIST], record[SecAggKey.SHARE_LIST]
    if not isinstance(owners, list) or not isinstance(shares, list) or len(owners) != len(shares):
        raise ValueError("an unmask answer must pair each node with one share")
    if any(type(o) is not int for o in owners) or any(type(s) is not bytes for s in shares):
        raise TypeError("an unmask answer holds values of the wrong type")
    return list(zip(cast(list[int], owners), cast(list[bytes], shares), strict=True))


def _masked_vector(reply: Message, length: int) -> np.ndarray:
    blobs = reply.content.config_records[SECAGG_CONFIGS][SecAggKey.MASKED_PARAMETERS]
    if not isinstance(blobs, list) or len(blobs) != 1 or not isinstance(blobs[0], bytes):
        raise ValueError("a masked reply must carry one masked vector")
    if len(blobs[0]) != 8 * length:
        raise ValueError(f"a masked vector of {len(blobs[0])} bytes for {length} coordinates")
    return np.frombuffer(blobs[0], dtype="<u8").astype(np.uint64)


__all__ = ["GateSecAggPlusWorkflow", "SecAggRoundFailed"]
