"""`fedgate node`: the deployment executor, in place of Flower's SuperExec + flwr-clientapp,
next to a stock `flower-supernode --isolation process`.

For each task the SuperNode offers it pulls the instruction, context and FAB over the
SuperNode's runtime API, asks the gate to admit the instruction, checks and installs the FAB
by the hospital's rules (fedgate.fab; never by Flower's installer), runs its ClientApp in a
fresh sandbox, passes the reply through the same gate as simulation and pushes what the gate
returns, with the context as pulled (only the ClientApp's state is taken from the sandbox).
Every failure on that path is a recorded refusal and a generic error; the node goes on."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgate.data.hospital import HospitalData
from fedgate.errors import FedgateError
from fedgate.executor.audit_data import configured_data
from fedgate.executor.hospital import Hospital, HospitalConfig
from fedgate.executor.trusted import TrustedTraining
from fedgate.fab import FabPolicy, install_fab
from fedgate.flower_adapter import (
    acquire_task,
    context_to_bytes,
    finish_task,
    message_from_bytes,
    message_to_bytes,
    pull_task,
    push_reply,
    recorddict_from_bytes,
    refusal,
    runtime_client,
    start_heartbeat,
)
from fedgate.gate.pipeline import GENERIC_REFUSAL
from fedgate.policy import Policy
from fedgate.sandbox.bwrap import find_tool
from fedgate.sandbox.runner import AppRef
from fedgate.sandbox.spec import SandboxError
from fedgate.secagg.handler import handlers_for

log = logging.getLogger("fedgate.node")
FAB_DIR = "fabs"


class NodeRefused(FedgateError):
    """The node will not start as configured (root without --allow-root, unsafe key files)."""


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
    allow_root: bool = False
    landlock: bool = True
    hospital_data: HospitalData | None = None  # trusted mode: overrides [training] dataset (a simulated share)


def check_node_user(config: NodeConfig) -> dict[str, Any]:
    """The node never runs as root unless told to (and then it is on record); the hospital
    folder is the node user's, and private keys in it are readable by that user only."""
    uid = os.geteuid()
    if uid == 0 and not config.allow_root:
        raise NodeRefused(
            "fedgate node refuses to run as root: run it as the dedicated user that owns the hospital folder "
            "(docs/deploy.md), or pass --allow-root, which every ledger entry then records"
        )
    folder = config.hospital_dir
    if folder.exists() and folder.stat().st_uid != uid:
        raise NodeRefused(f"{folder} belongs to uid {folder.stat().st_uid}, not to the node's user ({uid})")
    for key in [*folder.glob("**/*.key"), *folder.glob("**/*.secret")]:
        mode = stat.S_IMODE(key.stat().st_mode)
        if mode & 0o077:
            raise NodeRefused(f"{key} is readable by others (mode {mode:o}); run chmod 600 on it")
    return {"node_uid": uid, "as_root": uid == 0}


def check_sandbox_tools(config: NodeConfig) -> dict[str, Any]:
    """Every task runs in bubblewrap: without it the node does not start (and says how to
    install it), rather than fail every task later. A policy that allows running without the
    sandbox (`[sandbox] allow_downgrade`) starts, and each task's ledger entry says so."""
    try:
        tools = {"bwrap": find_tool("bwrap")}
        if os.geteuid() == 0:
            tools["setpriv"] = find_tool("setpriv")  # the outer sandbox drops root with it
    except SandboxError as err:
        if config.policy.sandbox.allow_downgrade:
            log.warning("%s; the policy allows running without the sandbox: tasks are recorded as unisolated", err)
            return {"sandbox_tools": "missing"}
        raise NodeRefused(f"fedgate node cannot sandbox a ClientApp: {err}") from err
    return {"sandbox_tools": tools}


def trusted_handlers(config: NodeConfig) -> tuple[TrustedTraining, ...]:
    """Trusted mode's handler, on the data the hospital configured: `[training] dataset` (or the
    share `--hospital-data` names), which must lie inside the data folder the sandbox sees."""
    training = config.policy.training
    if not training.allows_trusted:
        return ()
    data = config.hospital_data or (HospitalData(training.dataset) if training.dataset else None)
    if data is None:
        raise NodeRefused(
            "[training] mode allows trusted training but names no dataset: set [training] dataset "
            "(e.g. folder:/srv/fedgate/images, inside --data-dir)"
        )
    kind, _, where = data.dataset.partition(":")
    if where and kind in ("folder", "dicom", "npz"):
        path = Path(where).resolve()
        if path != config.data_dir and config.data_dir not in path.parents:
            raise NodeRefused(f"[training] dataset {data.dataset} is outside --data-dir {config.data_dir}: "
                              "the sandbox could not read it")  # fmt: skip
    return (TrustedTraining(config.policy, data),)


def fab_source(config: NodeConfig, fab: bytes, claimed: str) -> Any:
    """The node's FAB intake, run only after the gate admitted the instruction."""

    def install() -> tuple[AppRef, dict[str, Any]]:
        policy: FabPolicy = config.policy.fab
        installed = install_fab(fab, config.hospital_dir / FAB_DIR, policy)
        evidence = {"fab_sha256": installed.sha256, "fab_hash_claimed": claimed, "fab": installed.report.to_json()}
        return AppRef(installed.client_app_ref, (installed.path,)), evidence

    return install


def run_task(config: NodeConfig, token: str, hospital: Hospital, node_facts: dict[str, Any]) -> None:
    """One task: pull, gate, FAB intake, sandbox, gate, push. Whatever fails, the SuperNode
    hears back (a gated reply or the generic refusal) and the ledger holds what happened."""
    client = runtime_client(config.runtime_api_address, config.insecure, config.root_certificates, token=token)
    heartbeat = start_heartbeat(client)
    context = None
    completed = False
    try:
        message, context, fab, claimed = pull_task(client)
        arrived = time.time()
        raw, ctx = message_to_bytes(message), context_to_bytes(context)
        try:
            outgoing, state = hospital.run_task(raw, ctx, arrived, fab_source(config, fab, claimed))
            reply = message_from_bytes(outgoing)
        except Exception:
            log.exception("the gate failed; sending the generic refusal only")
            reply, state = refusal(message, time.time(), GENERIC_REFUSAL), None
        if state is not None:
            context.state = recorddict_from_bytes(state)  # the ids stay as pulled
        push_reply(client, reply, context)
        completed = True
    finally:
        try:
            finish_task(client, context, completed)
        finally:
            heartbeat.stop()
            client.close()


def serve(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Poll the SuperNode for ClientApp tasks until `stop` is set."""
    stop = stop or threading.Event()
    facts = check_node_user(config)
    facts.update(check_sandbox_tools(config))
    config.hospital_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = config.hospital_dir.name
    hospital = Hospital(
        HospitalConfig(
            name=name, folder=config.hospital_dir, policy=config.policy, destination=config.destination,
            data_dir=config.data_dir, landlock=config.landlock, preload=(), keep_worker=False, keep_state=False,
            handlers=(*handlers_for(config.policy, config.policy.secagg), *trusted_handlers(config)),
            masks=(config.hospital_dir,), data=configured_data(config.policy),
            executor={"executor": "fedgate-node", **facts},
        )
    )  # fmt: skip
    fingerprint = hospital.call(lambda: hospital.gate.ledger.fingerprint)  # the ledger lives on its thread
    log.info("%s: ledger key fingerprint %s", name, fingerprint)
    client = runtime_client(config.runtime_api_address, config.insecure, config.root_certificates,
                            config.superexec_auth_secret)  # fmt: skip
    log.info("%s: serving ClientApp tasks from %s", name, config.runtime_api_address)
    try:
        while not stop.is_set():
            token = acquire_task(client)
            if token:
                try:
                    run_task(config, token, hospital, facts)
                except Exception:  # one bad task must not stop the node (it is logged)
                    log.exception("task failed")
                continue
            stop.wait(config.poll_s)
    finally:
        hospital.close()
        client.close()
