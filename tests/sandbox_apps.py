"""A ClientApp that tries every way out of the sandbox and reports, as 0/1 metrics, which
worked. Run directly by the sandbox tests (no gate in between: the test reads the truth)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _tcp(host: str, port: int) -> Callable[[], None]:
    def attempt() -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect((host, port))

    return attempt


def _unix(path: str) -> Callable[[], None]:
    def attempt() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(path)

    return attempt


def attempts(config: dict[str, object]) -> dict[str, Callable[[], object]]:
    port = int(str(config["tcp-port"]))
    data = Path(str(config["data-dir"]))
    return {
        "tcp-loopback": _tcp("127.0.0.1", port),
        "tcp-loopback-v6": _tcp("::1", port),
        "tcp-superlink": _tcp("127.0.0.1", int(str(config.get("superlink-port", port)))),
        "unix-socket": _unix(str(config["unix-socket"])),
        "resolve-localhost": lambda: socket.getaddrinfo("localhost", 80),
        "resolve-hostname": lambda: socket.getaddrinfo(socket.gethostname(), 80),
        "write-data": lambda: (data / "planted.txt").write_text("x"),
        "delete-data": lambda: (data / "scan-0.png").unlink(),
        "read-outside": lambda: Path(str(config["secret-file"])).read_bytes(),
        "list-outside": lambda: os.listdir(str(config["outside-dir"])),
        "read-parent-environ": lambda: Path(f"/proc/{os.getppid()}/environ").read_bytes(),
        "setns-back": lambda: os.setns(os.open(f"/proc/{os.getppid()}/ns/net", os.O_RDONLY), 0),  # type: ignore[attr-defined]
    }


def controls(config: dict[str, object]) -> dict[str, Callable[[], object]]:
    """What must keep working: reading the data folder, writing the scratch folder."""
    data = Path(str(config["data-dir"]))
    return {
        "read-data": lambda: (data / "scan-0.png").read_bytes(),
        "write-scratch": lambda: (Path(os.environ["TMPDIR"]) / "notes.txt").write_text("ok"),
        "import-numpy": lambda: __import__("numpy").zeros(3).sum(),
    }


def _succeeded(attempt: Callable[[], object]) -> int:
    try:
        attempt()
    except Exception:
        return 0
    return 1


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = dict(context.run_config)
    results = {f"escape:{name}": _succeeded(a) for name, a in attempts(config).items()}
    results.update({f"control:{name}": _succeeded(a) for name, a in controls(config).items()})
    return Message(RecordDict({"metrics": MetricRecord(results)}), reply_to=msg)
