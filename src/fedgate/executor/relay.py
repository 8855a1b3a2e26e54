"""Simulation: Flower's engine runs in a child process (the ServerApp and Ray's actors, i.e.
the research team's side); the hospitals — their gates, ledgers and sandboxes — stay in the
`fedgate run` process. The actors reach them through this relay: a Unix socket in the run
folder (mode 0700), a per-run token, and the same strict frames as the sandbox's pipes.

    actor -> hospitals   {token, hospital, kind, error}  instruction-bytes  context-bytes  [reply-bytes]
    hospitals -> actor   {ok, error}  outgoing-message-bytes

So the gate never shares memory with a ClientApp (it is in a sandbox) nor with the ServerApp
(it is in the other process): what each side gets from the other is bytes."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedgate.errors import GENERIC_REFUSAL
from fedgate.sandbox.wire import WireError, recv_bytes, recv_json, send_bytes, send_json

log = logging.getLogger("fedgate.relay")
REQUEST_KEYS = frozenset({"token", "hospital", "kind", "error"})
PARTITION_KEY = "partition-id"


def hospital_name(partition_id: int) -> str:
    return f"hospital-{partition_id}"


class RelayServer:
    """Serves the hospitals of one run to the simulation's actors."""

    def __init__(self, path: Path, token: str, hospitals: Mapping[str, Any], max_frame: int) -> None:
        self.path = path
        self.token = token
        self.hospitals = hospitals
        self.max_frame = max_frame
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        path.unlink(missing_ok=True)
        self._sock.bind(str(path))
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fedgate-relay")
        self.errors: list[str] = []

    def start(self) -> RelayServer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            fd = conn.fileno()
            try:
                request = recv_json(fd, keys=REQUEST_KEYS)
                if not hmac.compare_digest(str(request["token"]), self.token):
                    raise WireError("bad relay token")
                hospital = self.hospitals[str(request["hospital"])]
                instruction = recv_bytes(fd, self.max_frame)
                context = recv_bytes(fd, self.max_frame)
                arrived = time.time()
                if request["kind"] == "task":
                    outgoing, _ = hospital.run_task(instruction, context, arrived)
                elif request["kind"] == "reply":
                    present = recv_json(fd, keys=frozenset({"present"}))["present"]
                    reply = recv_bytes(fd, self.max_frame) if present else None
                    outgoing = hospital.gate_reply(instruction, reply, str(request["error"])[:2000], arrived)
                else:
                    raise WireError(f"unknown request kind {request['kind']!r}")
            except BaseException as err:
                detail = f"{type(err).__name__}: {err}"
                log.error("relay: %s\n%s", detail, traceback.format_exc())
                self.errors.append(detail)
                with contextlib.suppress(OSError):
                    fallback = _generic_refusal(locals().get("instruction"))
                    if fallback is None:
                        send_json(fd, {"ok": False, "error": GENERIC_REFUSAL})
                    else:
                        send_json(fd, {"ok": True, "error": ""})
                        send_bytes(fd, fallback)
                return
            with contextlib.suppress(OSError):
                send_json(fd, {"ok": True, "error": ""})
                send_bytes(fd, outgoing)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _generic_refusal(instruction: object) -> bytes | None:
    """When the gate itself failed (its ledger, a bug): the generic refusal, built from the
    instruction alone; the failure's text stays here, in the log."""
    from fedgate.flower_adapter import message_from_bytes, message_to_bytes, refusal

    if not isinstance(instruction, bytes):
        return None
    try:
        return message_to_bytes(refusal(message_from_bytes(instruction), time.time(), GENERIC_REFUSAL))
    except Exception:
        return None


class RelayClientApp(ClientApp):
    """The ClientApp Flower's actors run: it forwards each message to the hospital's gate.
    With `inner` (--no-isolation only) it first runs the research team's ClientApp right here,
    in the actor's process, and relays its reply: nothing is enforced then, and the ledger says so."""

    def __init__(
        self,
        path: str,
        token: str,
        run_config: Mapping[str, bool | int | float | str],
        max_frame: int,
        inner: str | None = None,
    ) -> None:
        super().__init__()
        self._path = path
        self._token = token
        self._run_config = dict(run_config)
        self._max_frame = max_frame
        self._inner_ref = inner
        self._inner: ClientApp | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_inner"] = None  # loaded again in each actor process
        return state

    def __call__(self, message: Message, context: Context) -> Message:
        from fedgate.flower_adapter import context_to_bytes, message_from_bytes, message_to_bytes

        hospital = hospital_name(int(context.node_config[PARTITION_KEY]))
        # Flower's Python simulation API fuses the run config only from an installed app; hand
        # the run's config over as `flwr run` would, on a copy (Flower refuses a changed one).
        merged = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(context.node_config),
                         state=context.state, run_config={**self._run_config, **dict(context.run_config)})  # fmt: skip
        instruction, ctx = message_to_bytes(message), context_to_bytes(merged)
        extra: list[bytes] = []
        kind, error = "task", ""
        interrupted: BaseException | None = None
        if self._inner_ref is not None:
            kind = "reply"
            reply, error, interrupted = self._run_inner(instruction, ctx)
            extra = [reply] if reply is not None else []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self._path)
            fd = sock.fileno()
            send_json(fd, {"token": self._token, "hospital": hospital, "kind": kind, "error": error[:2000]})
            send_bytes(fd, instruction)
            send_bytes(fd, ctx)
            if kind == "reply":
                send_json(fd, {"present": bool(extra)})
                for frame in extra:
                    send_bytes(fd, frame)
            answer = recv_json(fd, keys=frozenset({"ok", "error"}))
            if not answer["ok"]:
                raise RuntimeError(GENERIC_REFUSAL)  # nothing of the hospital's failure in Flower's error
            outgoing = message_from_bytes(recv_bytes(fd, self._max_frame))
        if interrupted is not None:  # recorded as a refusal first, then honoured
            raise interrupted
        return outgoing

    def _run_inner(self, instruction: bytes, context: bytes) -> tuple[bytes | None, str, BaseException | None]:
        """--no-isolation: the ClientApp gets its own copy, decoded from bytes, and its reply is
        serialised before the gate sees it. Whatever it raises is a refusal; a KeyboardInterrupt
        or SystemExit is re-raised, but only after the refusal is recorded."""
        from fedgate.executor.loading import load_client_app
        from fedgate.flower_adapter import context_from_bytes, message_from_bytes, message_to_bytes

        try:
            if self._inner is None:
                assert self._inner_ref is not None
                self._inner = load_client_app(self._inner_ref)
            reply = self._inner(message_from_bytes(instruction), context_from_bytes(context))
            return message_to_bytes(reply), "", None
        except BaseException as err:
            interrupted = err if isinstance(err, (KeyboardInterrupt, SystemExit)) else None
            return None, f"{type(err).__name__}: {err}"[:2000], interrupted
