"""Deployment: flower-superlink (TLS, SuperNode authentication) + per hospital a stock
flower-supernode --isolation process and a fedgate node, as separate processes on loopback.
The same malicious replies as in simulation are refused by the same rules (one pipeline,
two executors), and a ClientApp trying every way out of the sandbox gets nowhere."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fedgate.errors import FedgateError
from fedgate.executor.local_federation import free_port, run_local_deployment
from fedgate.gate.pipeline import content_from_bytes
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger
from malicious_apps import ATTACK_RULES, CANARY, check_refusals

TESTS = Path(__file__).resolve().parents[1]
TEST_APP_FILES = ("malicious_apps.py", "canary_server_app.py", "model_fixtures.py", "sandbox_apps.py")


def processes_of(run_dir: Path) -> list[str]:
    """Processes whose command line names `run_dir`, or that run inside it (sandbox children)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone, or not ours to read
        if str(run_dir) in cmdline or cwd.startswith(str(run_dir)):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_reference_app_trains_across_three_hospitals(tmp_path: Path) -> None:
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
    assert processes_of(out) == [], "processes were left running"


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


def test_every_process_is_stopped_on_ctrl_c_and_on_failure(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "300"}
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "fedgate.cli.main", "demo", "--deploy", "--hospitals", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    while "federation up" not in (line := proc.stdout.readline()):  # wait until the whole federation is up
        assert line, "fedgate demo --deploy exited before the federation was up"
    assert len(processes_of(out)) >= 5  # superlink + 2 x (supernode + fedgate node)
    proc.send_signal(signal.SIGINT)
    output = proc.stdout.read()  # the same buffered reader as above, to its end
    proc.wait(timeout=60)
    assert proc.returncode == 130 and "every process of the federation has been stopped" in output
    assert "Traceback" not in output
    assert processes_of(out) == []

    terminated = tmp_path / "terminated"  # as systemd or `kill` would stop it
    proc = subprocess.Popen(
        [*cmd[:-1], str(terminated)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    while "federation up" not in (line := proc.stdout.readline()):
        assert line, "fedgate demo --deploy exited before the federation was up"
    proc.terminate()
    proc.wait(timeout=60)
    assert processes_of(terminated) == []

    failing = tmp_path / "failing"
    with pytest.raises(FedgateError, match="flwr run failed"):
        run_local_deployment(failing, 1, 1, None, {}, Console(quiet=True), app_dir=tmp_path)  # not an app
    assert processes_of(failing) == []
