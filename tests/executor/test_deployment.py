"""Deployment: flower-superlink (TLS, SuperNode authentication) + per hospital a stock
flower-supernode --isolation process and a fedgate node, as separate processes on loopback.
The same malicious replies as in simulation are refused by the same rules (one seam, two
executors); a ClientApp trying fedgate's escape suite gets nowhere; a FAB one hospital did not
approve is refused there and the run goes on; every process stops on Ctrl-C, SIGTERM or failure."""

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

from conftest import ATTACK_SETS
from fedgate.errors import FedgateError
from fedgate.executor.local_federation import free_port, run_local_deployment
from fedgate.executor.node import NodeConfig, NodeRefused, check_node_user, check_sandbox_tools
from fedgate.flower_adapter import message_from_bytes
from fedgate.gate.entries import ReplyEntry, read_entries
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger
from fedgate.policy import default_policy_text, load_policy
from malicious_apps import CANARY, check_refusals

TESTS = Path(__file__).resolve().parents[1]
TEST_APP_FILES = ("malicious_apps.py", "canary_server_app.py", "model_fixtures.py", "sandbox_apps.py")
HANG_S = 900  # only a hang detector
ESCAPES = (
    "tcp-loopback", "unix-pathname", "socketpair-sendto", "netlink", "io-uring", "resolve-name", "read-secret",
    "list-hospital", "write-data", "delete-data", "chmod-data", "setns-back", "unshare-user", "mount-tmpfs",
    "ptrace-parent", "tiocsti", "open-tty", "stray-descriptors", "x32-abi", "bpf", "keyctl", "write-root",
    "write-proc-sys", "set-clock",
)  # fmt: skip
WORLD_KEYS = ("tcp_port", "unix_path", "unix_dgram_path", "secret_file", "hospital_dir", "data_dir", "data_file")


def processes_of(run_dir: Path) -> list[str]:
    """Processes whose command line names `run_dir`, or that run inside it: the test's own
    check that nothing was left (the product itself never scans other processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone, or not ours to read
        if str(run_dir) in cmdline or cwd.startswith(str(run_dir)):
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.mark.slow  # the real app, three hospitals, full images; the fast run checks the same records below
def test_reference_app_trains_across_three_hospitals(tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "fedgate.cli.main", "demo", "--deploy", "--hospitals", "3", "--rounds", "2",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    accuracies = [r["accuracy"] for r in summary["per_round"]]
    assert [r["round"] for r in summary["per_round"]] == [0, 1, 2]
    assert accuracies[-1] > accuracies[0], accuracies
    for hospital_dir in map(Path, summary["hospitals_dirs"]):
        assert verify_ledger(hospital_dir / "ledger").entries == 5  # policy + 2 x (train + evaluate)
        with Ledger(hospital_dir / "ledger", create=False) as ledger:
            sent = [e for e in read_entries(ledger) if isinstance(e, ReplyEntry) and e.sent]
        assert len(sent) == 4
        for entry in sent:  # every reply came out of a fully isolated sandbox, of the FAB we checked
            assert entry.isolation_mode == "sandbox" and entry.isolation_enforced
            assert entry.executor["as_root"] == (os.geteuid() == 0)  # --allow-root is on record
            assert len(entry.executor["fab_sha256"]) == 64 and entry.executor["fab"]["verdict"] == "accepted"
            assert entry.destination.startswith("https://127.0.0.1:")
        assert (hospital_dir / "report.html").is_file()
        assert [p.parent.name for p in (hospital_dir / "fabs").glob("*/pyproject.toml")] == [
            sent[0].executor["fab_sha256"]
        ]
    logs = out / "logs"
    assert "insecure" not in (logs / "superlink.log").read_text().lower()
    assert "authentication is disabled" not in (logs / "superlink.log").read_text()
    assert processes_of(out) == [], "processes were left running"


def make_test_fab(folder: Path, extra: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True)
    for name in TEST_APP_FILES:
        shutil.copy(TESTS / name, folder / name)
    keys = {
        "attacks": '"honest"', "phases": '"train:1,evaluate:1,train:2"', "capture-file": '""', "attempts": '""',
        "num-server-rounds": "2", "num-hospitals": "0", "metrics-file": '""', **(extra or {}),
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


@pytest.mark.parametrize("played", ATTACK_SETS)
def test_same_refusals_as_simulation_no_way_out_and_an_unapproved_fab_is_refused(
    tmp_path: Path, played: list[str]
) -> None:
    attacks = [*played, "sandbox-escape", "honest"]
    escape, unapproving = len(attacks) - 2, len(attacks) - 1
    secret = tmp_path / "private" / "ledger-key"
    secret.parent.mkdir()
    secret.write_text("private")
    unix_path = str(tmp_path / "engine.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen()
    listener = socket.create_server(("127.0.0.1", 0))
    out = tmp_path / "deploy"
    data_dir = out / f"hospital-{escape}" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "scan-0.png").write_bytes(b"\x89PNG")
    world = {
        "tcp_port": str(listener.getsockname()[1]), "unix_path": f'"{unix_path}"', "unix_dgram_path": f'"{unix_path}"',
        "secret_file": f'"{secret}"', "hospital_dir": f'"{out / f"hospital-{escape}"}"', "data_dir": f'"{data_dir}"',
        "data_file": '"scan-0.png"',
    }  # fmt: skip
    app_dir = make_test_fab(tmp_path / "fab", world)
    strict = tmp_path / "strict.toml"  # this hospital approves only another app's hash
    strict.write_text(default_policy_text().replace("approved = []", f'approved = ["sha256:{"0" * 64}"]'))
    config = {"attacks": ",".join(attacks), "capture-file": "server-received.bin", "attempts": ",".join(ESCAPES)}
    summary = run_local_deployment(
        out, len(attacks), 2, None, config, Console(quiet=True), app_dir=app_dir, link_port=free_port(),
        hospital_policies={unapproving: strict},
    )  # fmt: skip

    check_refusals(summary, attacks[:escape])  # exactly the rules of the simulation test
    assert [r["rule"] for r in summary["refusals"][f"hospital-{escape}"]] == ["extra-record"] * 2  # its records
    with Ledger(out / f"hospital-{escape}" / "ledger", create=False) as ledger:
        refused = next(e for e in read_entries(ledger) if isinstance(e, ReplyEntry) and not e.sent)
        stopped = message_from_bytes(ledger.blobs.get(refused.payload_sha256)).content  # the reply as handed back
    escaped = {name: value for name, value in stopped.metric_records["escapes"].items() if value}
    assert set(stopped.metric_records["escapes"]) == set(ESCAPES) and not escaped, escaped
    assert [p.name for p in data_dir.iterdir()] == ["scan-0.png"]
    for server in (listener, unix):
        server.settimeout(0.5)
        with pytest.raises(OSError):
            server.accept()
        server.close()

    fab_refusals = summary["refusals"][f"hospital-{unapproving}"]
    assert {r["rule"] for r in fab_refusals} == {"fab-not-approved"}
    assert not (out / f"hospital-{unapproving}" / "fabs").exists() or not any(
        (out / f"hospital-{unapproving}" / "fabs").iterdir()
    )  # nothing of the unapproved app was written
    assert summary["egress"]["hospital-0"]["replies_sent"] == 3  # the run went on for the others
    received = (out / "runs" / str(summary["run_id"]) / "server-received.bin").read_bytes()
    assert CANARY not in received and b"patient-0042" not in received
    assert b"fab" not in received.lower() or b"not-approved" not in received  # only the generic refusal

    # What the slow reference run checks of every reply, here of an honest hospital's.
    assert attacks[0] == "honest"
    with Ledger(out / "hospital-0" / "ledger", create=False) as ledger:
        sent = [e for e in read_entries(ledger) if isinstance(e, ReplyEntry) and e.sent]
    assert len(sent) == 3
    for entry in sent:  # out of a fully isolated sandbox, of the FAB this hospital checked, over TLS
        assert entry.isolation_mode == "sandbox" and entry.isolation_enforced
        assert entry.executor["as_root"] == (os.geteuid() == 0)
        assert len(entry.executor["fab_sha256"]) == 64 and entry.executor["fab"]["verdict"] == "accepted"
        assert entry.destination.startswith("https://127.0.0.1:")
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert "insecure" not in superlink_log.lower() and "authentication is disabled" not in superlink_log
    assert processes_of(out) == [], "processes were left running"


def test_every_process_is_stopped_on_ctrl_c_on_sigterm_and_on_failure(tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "300"}
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "fedgate.cli.main", "demo", "--deploy", "--hospitals", "2", "--out", str(out)]
    for stop, folder in ((signal.SIGINT, out), (signal.SIGTERM, tmp_path / "terminated")):
        proc = subprocess.Popen(
            [*cmd[:-1], str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        while "federation up" not in (line := proc.stdout.readline()):  # wait until the whole federation is up
            assert line, "fedgate demo --deploy exited before the federation was up"
        assert len(processes_of(folder)) >= 5  # superlink + 2 x (supernode + fedgate node)
        proc.send_signal(stop)
        output = proc.stdout.read()
        proc.wait(timeout=HANG_S)
        assert proc.returncode == 130, output
        assert "every process of the federation was stopped" in output and "Traceback" not in output
        assert processes_of(folder) == []
        for ledger in folder.glob("hospital-*/ledger"):
            verify_ledger(ledger)

    failing = tmp_path / "failing"
    with pytest.raises(FedgateError, match="flwr run failed"):
        run_local_deployment(failing, 1, 1, None, {}, Console(quiet=True), app_dir=tmp_path)  # not an app
    assert processes_of(failing) == []


def test_the_node_refuses_root_unless_told_and_unsafe_keys(tmp_path: Path) -> None:
    config = NodeConfig("127.0.0.1:1", tmp_path / "h", tmp_path, load_policy(None), "https://x")
    if os.geteuid() == 0:
        with pytest.raises(NodeRefused, match="--allow-root"):
            check_node_user(config)
    allowed = NodeConfig("127.0.0.1:1", tmp_path / "h", tmp_path, load_policy(None), "https://x", allow_root=True)
    assert check_node_user(allowed)["node_uid"] == os.geteuid()
    (tmp_path / "h" / "keys").mkdir(parents=True)
    key = tmp_path / "h" / "keys" / "auth.key"
    key.write_text("k")
    key.chmod(0o644)
    with pytest.raises(NodeRefused, match="chmod 600"):
        check_node_user(allowed)


def test_the_node_refuses_to_start_without_bubblewrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No bwrap on the host: the node does not start, and says how to install it; with the
    policy's explicit downgrade it starts, and says so in every entry (`sandbox_tools`)."""
    import dataclasses

    import fedgate.sandbox.bwrap as bwrap

    config = NodeConfig("127.0.0.1:1", tmp_path / "h", tmp_path, load_policy(None), "https://x", allow_root=True)
    assert "bwrap" in check_sandbox_tools(config)["sandbox_tools"]
    monkeypatch.setattr(bwrap.shutil, "which", lambda name: None)
    monkeypatch.setattr(bwrap.os, "access", lambda path, mode: False)
    with pytest.raises(NodeRefused, match="apt install bubblewrap"):
        check_sandbox_tools(config)
    policy = load_policy(None)
    lenient = dataclasses.replace(policy, sandbox=dataclasses.replace(policy.sandbox, allow_downgrade=True))
    assert check_sandbox_tools(dataclasses.replace(config, policy=lenient)) == {"sandbox_tools": "missing"}
