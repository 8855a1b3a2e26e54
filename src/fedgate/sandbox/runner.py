"""The gate's side of the sandbox: start the child, check that every isolation layer was
established (or record a downgrade the policy allows), hand it one message, read its reply."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedgate.errors import FedgateError
from fedgate.sandbox.layers import Limits
from fedgate.sandbox.wire import recv_bytes, recv_json, send_bytes, send_json

log = logging.getLogger("fedgate.sandbox")


class SandboxRefused(FedgateError):
    """Isolation could not be established and the policy does not allow a downgrade."""


class SandboxFailed(FedgateError):
    """The sandboxed ClientApp crashed, timed out or answered with something unreadable."""


@dataclass(frozen=True)
class SandboxConfig:
    data_dir: Path
    scratch_root: Path
    limits: Limits = field(default_factory=Limits)
    allow_downgrade: bool = False
    timeout_s: float = 3600.0


@dataclass(frozen=True)
class SandboxOutcome:
    reply: Message | BaseException
    context: Context
    isolation: list[dict[str, Any]]

    @property
    def downgraded(self) -> list[str]:
        return missing_layers(self.isolation)


def missing_layers(isolation: list[dict[str, Any]]) -> list[str]:
    """The isolation layers the child reported as not established."""
    return [layer["layer"] for layer in isolation if not layer["established"]]


def _child_env(scratch: Path, cache: Path) -> dict[str, str]:
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        HOME=str(scratch),
        TMPDIR=str(scratch),
        FEDGATE_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        FLWR_TELEMETRY_ENABLED="0",
        PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def run_in_sandbox(
    config: SandboxConfig, app_ref: str, app_dir: Path, message: Message, context: Context
) -> SandboxOutcome:
    """Run `app_ref` (MODULE:ATTR under `app_dir`) on one message in a fresh child."""
    config.scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="task-", dir=config.scratch_root))
    # The app's own cache (decoded images) outlives a task, so that each round does not
    # decode the data again; like the scratch folder it is the app's, and stays here.
    cache = config.scratch_root / "app-cache"
    cache.mkdir(exist_ok=True)
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgate.sandbox.child", str(to_child_r), str(from_child_w)],
        pass_fds=(to_child_r, from_child_w),
        env=_child_env(scratch, cache),
        cwd=scratch,
        stdin=subprocess.DEVNULL,
    )
    os.close(to_child_r)
    os.close(from_child_w)
    result: dict[str, Any] = {}

    def converse() -> None:
        try:
            header = {
                "app_ref": app_ref,
                "app_dir": str(app_dir),
                "data_dir": str(config.data_dir),
                "scratch_dirs": [str(scratch), str(cache)],
                "limits": dataclasses.asdict(config.limits),
                "message_id": message.metadata.message_id,
            }
            send_json(to_child_w, header)
            isolation = recv_json(from_child_r).get("isolation", [])
            result["isolation"] = isolation
            missing = missing_layers(isolation)
            if missing and not config.allow_downgrade:
                send_json(to_child_w, {"run": False})
                result["refused"] = missing
                return
            send_json(to_child_w, {"run": True})
            send_bytes(to_child_w, message_to_proto(message).SerializeToString())
            send_bytes(to_child_w, context_to_proto(context).SerializeToString())
            status = recv_json(from_child_r)
            if not status.get("ok"):
                result["error"] = str(status.get("error", "unknown error"))
                log.warning("sandboxed ClientApp failed: %s", status.get("trace", ""))
                return
            result["reply"] = message_from_proto(ProtoMessage.FromString(recv_bytes(from_child_r)))
            result["context"] = context_from_proto(ProtoContext.FromString(recv_bytes(from_child_r)))
        except Exception as err:  # a closed pipe, a bad frame, bytes that do not decode: all untrusted
            result["error"] = f"the sandbox's answer is unreadable: {type(err).__name__}: {err}"

    talker = threading.Thread(target=converse, daemon=True)
    talker.start()
    talker.join(config.timeout_s)
    try:
        if talker.is_alive():
            proc.kill()
            result.setdefault("error", f"the ClientApp did not answer within {config.timeout_s:.0f} s")
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    finally:
        for fd in (to_child_w, from_child_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
    isolation = result.get("isolation", [])
    if "refused" in result:
        raise SandboxRefused(
            f"isolation could not be established ({', '.join(result['refused'])}); "
            "set [sandbox] allow_downgrade = true in the policy to run anyway, recorded as a downgrade"
        )
    if not isolation:
        raise SandboxRefused(f"the sandbox child exited ({proc.returncode}) before reporting its isolation")
    if downgraded := missing_layers(isolation):
        log.error(
            "SANDBOX DOWNGRADED: running untrusted code without %s (allowed by the policy)", ", ".join(downgraded)
        )
    if "reply" in result:
        return SandboxOutcome(result["reply"], result["context"], isolation)
    error = result.get("error") or f"the sandbox child exited with status {proc.returncode} without a reply"
    return SandboxOutcome(SandboxFailed(error), context, isolation)
