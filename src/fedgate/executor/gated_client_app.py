"""The simulation executor's half of the seam: a ClientApp that runs the untrusted one
in process and hands every reply to the hospital's gate pipeline."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedgate.gate.pipeline import GENERIC_REFUSAL, REFUSAL_CODE, GatePipeline
from fedgate.policy import Policy

log = logging.getLogger("fedgate.executor")


def hospital_name(partition_id: int) -> str:
    return f"hospital-{partition_id}"


class GatedClientApp(ClientApp):
    """Wraps `inner`; Ray pickles this object into its actors, so it carries only the
    policy and paths, and opens each hospital's ledger lazily in the process that runs it."""

    def __init__(
        self,
        inner: ClientApp,
        policy: Policy,
        out_dir: Path,
        destination: str,
        run_config: Mapping[str, bool | int | float | str] | None = None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._run_config = dict(run_config or {})
        self._policy = policy
        self._out_dir = Path(out_dir)
        self._destination = destination
        self._pipelines: dict[str, GatePipeline] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pipelines"] = {}  # ledger connections do not cross processes
        return state

    def pipeline(self, hospital: str) -> GatePipeline:
        if hospital not in self._pipelines:
            self._pipelines[hospital] = GatePipeline(
                self._policy, self._out_dir / hospital, hospital, self._destination
            )
        return self._pipelines[hospital]

    def __call__(self, message: Message, context: Context) -> Message:
        hospital = hospital_name(int(context.node_config["partition-id"]))
        reply: Message | BaseException
        original_config = context.run_config
        # Flower's Python simulation API fuses run config only from an installed FAB; without
        # one, hand the run's config to the ClientApp as `flwr run` would, and put Flower's
        # back afterwards (it refuses a context whose run config changed).
        context.run_config = {**self._run_config, **original_config}
        try:
            reply = self._inner(message, context)
        except Exception as err:  # the ClientApp's exception text could carry data: it stays here
            reply = err
        finally:
            context.run_config = original_config
        try:
            return self.pipeline(hospital).process(message, reply)
        except Exception as err:
            # The gate or its ledger failed: fail closed. Only the generic refusal leaves, never the reply.
            log.error("%s: the gate could not record a reply, nothing sent: %s", hospital, err)
            return Message(Error(code=REFUSAL_CODE, reason=GENERIC_REFUSAL), reply_to=message)
