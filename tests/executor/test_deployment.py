"""Deployment: flower-superlink (TLS, SuperNode authentication) + per hospital a stock
flower-supernode --isolation process and a fedgate node, as separate processes on loopback.
The same malicious replies as in simulation are refused by the same rules (one pipeline,
two executors), and a ClientApp trying every way out of the sandbox gets nowhere."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from fedgate.executor.local_federation import free_port, run_local_deployment
from fedgate.gate.pipeline import content_from_bytes
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger
from malicious_apps import ATTACK_RULES, CANARY, check_refusals

TESTS = Path(__file__).resolve().parents[1]
TEST_APP_FILES = ("malicious_apps.py", "canary_server_app.py", "model_fixtures.py", "sandbox_apps.py")


def flower_processes() -> set[int]:
    out = subprocess.run(
        ["pgrep", "-f", "flower-super|fedgate node|fedgate.sandbox.child"], capture_output=True, text=True
    )
    return {int(pid) for pid in out.stdout.split()}


def test_reference_app_trains_across_three_hospitals(tmp_path: Path) -> None:
    before = flower_processes()
    out = tmp_path / "deploy"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    cmd = [
        sys.executable,
        "-m",
        "fedgate.cli.main",
        "demo",
        "--deploy",
        "--hospitals",
        "3",
        "--rounds",
        "2",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    accuracies = [r["accuracy"] for r in summary["per_round"]]
    assert [r["round"] for r in summary["per_round"]] == [0, 1, 2]
    assert accuracies[-1] > accuracies[0], accuracies
    for hospital_dir in map(Path, summary["hospitals_dirs"]):
        assert verify_ledger(hospital_dir / "ledger").entries == 5  # policy + 2 x (train + evaluate)
        with Ledger(hospital_dir / "ledger", create=False) as ledger:
            sent = [e for e in ledger.entries() if e["kind"] == "reply-sent"]
        assert len(sent) == 4
        for entry in sent:  # every reply came out of a fully isolated sandbox
            assert {layer["layer"]: layer["established"] for layer in entry["executor"]["sandbox"]} == {
                "limits": True, "network-namespace": True, "landlock": True, "seccomp": True,
            }  # fmt: skip
            assert entry["destination"].startswith("https://127.0.0.1:")
        assert (hospital_dir / "report.html").is_file()
    logs = out / "logs"
    assert "insecure" not in (logs / "superlink.log").read_text().lower()
    assert "authentication is disabled" not in (logs / "superlink.log").read_text()
    assert flower_processes() <= before, "processes were left running"


def make_test_fab(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in TEST_APP_FILES:
        shutil.copy(TESTS / name, folder / name)
    keys = {
        "attacks": '"honest"', "phases": '"train:1,evaluate:1,train:2"', "capture-file": '""', "tcp-port": "0",
        "superlink-port": "0", "unix-socket": '""', "data-dir": '""', "secret-file": '""', "outside-dir": '""',
        "num-server-rounds": "2", "num-hospitals": "0", "metrics-file": '""',
    }  # fmt: skip
    config = "\n".join(f"{k} = {v}" for k, v in keys.items())
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "fedgate-attacks"\nversion = "0.1.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n[tool.flwr.app]\npublisher = "fedgate-tests"\n\n'
        '[tool.flwr.app.components]\nserverapp = "canary_server_app:app"\nclientapp = "malicious_apps:app"\n\n'
        f"[tool.flwr.app.config]\n{config}\n"
    )
    return folder


def test_same_refusals_as_simulation_and_no_way_out_of_the_sandbox(tmp_path: Path) -> None:
    attacks = [*ATTACK_RULES, "sandbox-escape"]
    escape = len(attacks) - 1
    capture = tmp_path / "server-received.bin"
    secret = tmp_path / "private" / "ledger-key"
    secret.parent.mkdir()
    secret.write_text("private")
    unix_path = str(tmp_path / "engine.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    out = tmp_path / "deploy"
    data_dir = out / f"hospital-{escape}" / "data"
    config = {
        "attacks": ",".join(attacks), "capture-file": str(capture), "unix-socket": unix_path,
        "data-dir": str(data_dir), "secret-file": str(secret), "outside-dir": str(secret.parent),
    }  # fmt: skip
    data_dir.mkdir(parents=True)
    (data_dir / "scan-0.png").write_bytes(b"\x89PNG")
    app_dir = make_test_fab(tmp_path / "fab")
    # The escaping app dials a listener of ours on loopback (IPv4 and IPv6) and the SuperLink itself.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    superlink_port = free_port()
    config["tcp-port"], config["superlink-port"] = listener.getsockname()[1], superlink_port
    summary = run_local_deployment(
        out, len(attacks), 2, None, config, Console(quiet=True), app_dir=app_dir, link_port=superlink_port
    )

    check_refusals(summary, attacks[:escape])  # exactly the rules of the simulation test
    refusals = summary["refusals"][f"hospital-{escape}"]
    assert [r["rule"] for r in refusals] == ["manifest", "manifest"]  # it sent metrics, no model
    with Ledger(out / f"hospital-{escape}" / "ledger", create=False) as ledger:
        refused = next(e for e in ledger.entries() if e["kind"] == "reply-refused")
        stopped = content_from_bytes(ledger.blobs.get(refused["payloads"]["refused"]["sha256"]))
    results = dict(stopped["metrics"])  # what the escaping app reported; it never left the hospital
    escapes = {k: v for k, v in results.items() if k.startswith("escape:")}
    assert len(escapes) == 12 and not any(escapes.values()), escapes
    assert all(v == 1 for k, v in results.items() if k.startswith("control:")), results
    assert [p.name for p in data_dir.iterdir()] == ["scan-0.png"]
    unix.settimeout(0.5)
    for server in (listener, unix):
        try:
            server.accept()
            raise AssertionError("something connected from inside the sandbox")
        except (TimeoutError, BlockingIOError, OSError):
            pass
        server.close()
    received = capture.read_bytes()
    assert CANARY not in received and b"patient-0042" not in received
