"""Untrusted code in the sandbox: every way out fails, the hospital's data stays read-only,
and the same attempts succeed outside the sandbox (so the test could fail)."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sandbox_apps
from conftest import instruction
from fedgate.sandbox.runner import SandboxConfig, SandboxFailed, SandboxRefused, run_in_sandbox

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A hospital data folder, a secret outside it, a TCP server and a Unix socket server."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan-0.png").write_bytes(b"\x89PNG not really")
    outside = tmp_path / "hospital-private"
    outside.mkdir()
    (outside / "ledger-key").write_text("private")
    tcp = socket.create_server(("127.0.0.1", 0), family=socket.AF_INET)
    tcp6 = socket.socket(socket.AF_INET6)
    tcp6.bind(("::1", tcp.getsockname()[1]))
    tcp6.listen()
    unix_path = str(tmp_path / "engine.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    accepted: list[str] = []

    def accept(server: socket.socket, name: str) -> None:
        server.settimeout(15)
        try:
            conn, _ = server.accept()
            accepted.append(name)
            conn.close()
        except OSError:
            pass

    threads = [
        threading.Thread(target=accept, args=(s, n), daemon=True)
        for s, n in ((tcp, "tcp"), (tcp6, "tcp6"), (unix, "unix"))
    ]
    for thread in threads:
        thread.start()
    config = {
        "tcp-port": tcp.getsockname()[1],
        "unix-socket": unix_path,
        "data-dir": str(data),
        "secret-file": str(outside / "ledger-key"),
        "outside-dir": str(outside),
    }
    yield {"config": config, "data": data, "tmp": tmp_path, "accepted": accepted}
    for server in (tcp, tcp6, unix):
        server.close()


def run(world: dict[str, Any], **config: Any) -> tuple[Any, list[dict[str, Any]]]:
    from flwr.app import Context, RecordDict

    context = Context(
        run_id=1,
        node_id=2,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config={**world["config"], **config},
    )
    sandbox = SandboxConfig(data_dir=world["data"], scratch_root=world["tmp"] / "scratch", timeout_s=120)
    outcome = run_in_sandbox(sandbox, "sandbox_apps:app", TESTS, instruction(), context)
    return outcome.reply, outcome.isolation


def test_every_layer_is_established(world: dict[str, Any]) -> None:
    _, isolation = run(world)
    assert {layer["layer"]: layer["established"] for layer in isolation} == {
        "limits": True,
        "network-namespace": True,
        "landlock": True,
        "seccomp": True,
    }


def test_every_escape_fails_inside_and_works_outside(world: dict[str, Any]) -> None:
    reply, _ = run(world)
    assert not isinstance(reply, BaseException), reply
    metrics = dict(reply.content["metrics"])
    escapes = {k.split(":", 1)[1]: v for k, v in metrics.items() if k.startswith("escape:")}
    assert escapes and all(v == 0 for v in escapes.values()), {k: v for k, v in escapes.items() if v}
    assert all(v == 1 for k, v in metrics.items() if k.startswith("control:")), metrics
    assert world["accepted"] == []  # no server saw a connection
    assert [p.name for p in world["data"].iterdir()] == ["scan-0.png"]

    # The same attempts outside the sandbox (the test process): most succeed, proving the
    # checks above can fail. (setns needs privileges the test may lack; the rest must work.)
    outside = {name: sandbox_apps._succeeded(a) for name, a in sandbox_apps.attempts(world["config"]).items()}
    for name in ("tcp-loopback", "unix-socket", "resolve-localhost", "write-data", "read-outside", "list-outside"):
        assert outside[name] == 1, name


def test_a_crashing_app_does_not_take_the_runner_down(world: dict[str, Any], tmp_path: Path) -> None:
    reply, isolation = run(world, **{"tcp-port": "not a port"})
    assert isinstance(reply, SandboxFailed) and "ValueError" in str(reply)
    assert all(layer["established"] for layer in isolation)


def test_isolation_failure_refuses_unless_downgrade_is_allowed(world: dict[str, Any]) -> None:
    from flwr.app import Context, RecordDict

    from fedgate.sandbox.layers import Limits

    # A layer that genuinely cannot be established: more open files than the kernel's nr_open.
    impossible = Limits(open_files=1 << 40)
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config=world["config"])
    strict = SandboxConfig(data_dir=world["data"], scratch_root=world["tmp"] / "s", limits=impossible, timeout_s=60)
    with pytest.raises(SandboxRefused, match="limits"):
        run_in_sandbox(strict, "sandbox_apps:app", TESTS, instruction(), context)
    lenient = dataclasses.replace(strict, allow_downgrade=True)
    outcome = run_in_sandbox(lenient, "sandbox_apps:app", TESTS, instruction(), context)
    assert outcome.downgraded == ["limits"]
    assert not isinstance(outcome.reply, BaseException)  # it ran, and the downgrade is reported
