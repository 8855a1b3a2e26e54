"""`fedgate node`: the deployment executor, in place of Flower's SuperExec + flwr-clientapp,
next to a stock `flower-supernode --isolation process`.

For each task the SuperNode offers it pulls the instruction, context, run and FAB over the
SuperNode's runtime API (Flower's own functions and protobufs), runs the FAB's ClientApp in
the sandbox, passes the reply through the same gate pipeline as simulation, and pushes what
the pipeline returns. Flower's task heartbeat runs on its own thread throughout, also while
a reply waits for human review."""

from __future__ import annotations

import contextlib
import logging
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Message
from flwr.cli.install import install_from_fab
from flwr.common.config import get_project_dir
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedgate.errors import FedgateError
from fedgate.gate.pipeline import GatePipeline
from fedgate.policy import Policy
from fedgate.sandbox.layers import Limits
from fedgate.sandbox.runner import SandboxConfig, run_in_sandbox

log = logging.getLogger("fedgate.node")
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


@dataclass(frozen=True)
class NodeConfig:
    runtime_api_address: str
    hospital_dir: Path
    data_dir: Path
    policy: Policy
    destination: str
    insecure: bool = True
    root_certificates: bytes | None = None
    superexec_auth_secret: bytes | None = None
    poll_s: float = 0.5

    def sandbox(self) -> SandboxConfig:
        limits = Limits(memory_mb=self.policy.sandbox_memory_mb, cpu_seconds=self.policy.sandbox_cpu_seconds)
        return SandboxConfig(
            data_dir=self.data_dir,
            scratch_root=self.hospital_dir / "scratch",
            limits=limits,
            allow_downgrade=self.policy.sandbox_allow_downgrade,
            timeout_s=self.policy.sandbox_timeout_s,
        )


def client_app_reference(app_dir: Path) -> str:
    """The ClientApp named in the FAB's pyproject.toml ([tool.flwr.app.components])."""
    try:
        config = tomllib.loads((app_dir / "pyproject.toml").read_text())
        return str(config["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise FedgateError(f"the FAB in {app_dir} names no ClientApp: {err}") from err


def _client(config: NodeConfig, *extra: ProtobufClientInterceptor) -> RuntimeHttpClient:
    interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    return RuntimeHttpClient.from_server_address(
        server_address=config.runtime_api_address,
        insecure=config.insecure,
        root_certificates=config.root_certificates,
        interceptors=[*interceptors, *extra],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def run_task(config: NodeConfig, token: str, pipeline: GatePipeline) -> None:
    """One task: pull, run sandboxed, gate, push. Whatever fails, the SuperNode hears back
    (a gated reply or a generic refusal) and the ledger holds what happened."""
    client = _client(config, RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details = SubStatus.FAILED, "fedgate node: task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)
        app_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
        evidence: dict[str, object] = {"executor": "fedgate-node", "fab_hash": fab.hash_str}
        reply: Message | BaseException
        try:
            outcome = run_in_sandbox(config.sandbox(), client_app_reference(app_dir), app_dir, message, context)
            reply = outcome.reply
            context = outcome.context
            evidence["sandbox"] = outcome.isolation
            evidence["sandbox_downgraded"] = outcome.downgraded
        except FedgateError as err:  # isolation refused: the untrusted code never ran
            reply = err
            evidence["sandbox_refused"] = str(err)
        outgoing = pipeline.process(message, reply, evidence)
        push_message(client, outgoing, context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:
        log.exception("task failed")
        details = f"fedgate node: {type(err).__name__}"
        raise
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def serve(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Poll the SuperNode for ClientApp tasks until `stop` is set."""
    stop = stop or threading.Event()
    interceptors: list[ProtobufClientInterceptor] = []
    if config.superexec_auth_secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=config.superexec_auth_secret, protected_methods=frozenset({ACQUIRE_METHOD})
            )
        )
    client = _client(config, *interceptors)
    hospital = config.hospital_dir.name
    pipeline = GatePipeline(config.policy, config.hospital_dir, hospital, config.destination)
    log.info("%s: serving ClientApp tasks from %s", hospital, config.runtime_api_address)
    try:
        while not stop.is_set():
            response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if response.HasField("task") and response.token:
                with contextlib.suppress(Exception):  # one bad task must not stop the node (logged)
                    run_task(config, response.token, pipeline)
                continue
            stop.wait(config.poll_s)
    finally:
        pipeline.close()
        client.close()
