"""End to end through Flower's simulation engine (Ray), via the `fedgate` command: each
hospital's ClientApp in its own sandbox, every reply through that hospital's gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ATTACK_SETS
from fedgate.ledger.verify import verify_ledger
from malicious_apps import ATTACK_RULES, CANARY, CANARY_TEXT, check_refusals

TESTS = Path(__file__).resolve().parents[1]
HANG_S = 600  # only a hang detector: nothing here is timed
# The reference app on a small federation (small images too): the summary, the ledgers and the
# sandboxes are the same at two hospitals as at three (`fedgate demo` and benchmarks/ run full size).
HOSPITALS = 2


def fedgate(*args: str, timeout: float = HANG_S) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedgate.cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("ref")
    result = fedgate(
        "run", "--hospitals", str(HOSPITALS), "--rounds", "2", "-c", "subset=200", "-c", "image-size=32",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "summary.json").read_text()), result.stdout


def test_summary_contract(reference_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = reference_run
    assert summary["hospitals"] == HOSPITALS and summary["rounds"] == 2
    assert [r["round"] for r in summary["per_round"]] == [0, 1, 2]
    for row in summary["per_round"]:
        assert set(row) == {"round", "loss", "accuracy", "auc"}
        assert 0.0 <= row["accuracy"] <= 1.0
    assert summary["final_accuracy"] == summary["per_round"][-1]["accuracy"]
    assert summary["final_auc"] == summary["per_round"][-1]["auc"]
    assert summary["seconds"] > 0
    assert summary["hospitals_dirs"] == [str(out / f"hospital-{i}") for i in range(HOSPITALS)]
    assert summary["refusals"] == {}
    assert (out / "runs" / str(summary["run_id"]) / "summary.json").is_file()
    for name in (f"hospital-{i}" for i in range(HOSPITALS)):
        assert summary["bits_per_reply"][name] > 0
        assert summary["bits_total"][name] > summary["bits_per_reply"][name]
        assert summary["egress"][name]["replies_sent"] == 4  # 2 rounds x (train + evaluate)
        assert summary["isolation"][name] == {"modes": ["sandbox"], "enforced": True}


def test_progress_lines_and_final_table(reference_run: tuple[Path, dict[str, Any], str]) -> None:
    _, _, stdout = reference_run
    assert "round   1/2" in stdout and "round   2/2" in stdout
    assert "AUC" in stdout and "bits / train reply" in stdout and "sandboxed" in stdout


def test_every_hospital_ledger_verifies_and_every_reply_was_isolated(
    reference_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, _ = reference_run
    for i in range(HOSPITALS):
        folder = out / f"hospital-{i}" / "ledger"
        assert verify_ledger(folder).entries == 5  # the policy, then 2 rounds x (train + evaluate)
        from fedgate.gate.entries import ReplyEntry, read_entries
        from fedgate.ledger.store import Ledger

        with Ledger(folder, create=False) as ledger:
            replies = [e for e in read_entries(ledger) if isinstance(e, ReplyEntry)]
        assert all(r.isolation_mode == "sandbox" and r.isolation_enforced for r in replies)
        assert all(e.executor["sandbox"]["rule"] == "" for e in replies)


@pytest.mark.parametrize("attacks", ATTACK_SETS)
def test_malicious_hospitals_are_refused_others_go_on_and_the_canary_never_leaves(
    tmp_path: Path, attacks: list[str]
) -> None:
    result = fedgate(
        "run", "--client-app", "malicious_apps:app", "--server-app", "canary_server_app:app",
        "--hospitals", str(len(attacks)), "--rounds", "2", "--out", str(tmp_path / "run"),
        "-c", f"attacks={','.join(attacks)}", "-c", "capture-file=server-received.bin",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    check_refusals(summary, attacks)
    received = (tmp_path / "run" / "runs" / str(summary["run_id"]) / "server-received.bin").read_bytes()
    # the honest replies did arrive: 10,000 bytes from the 13 hospitals of every attack, as much a hospital here
    assert len(received) > 10_000 * len(attacks) // len(ATTACK_RULES)
    for form in (CANARY, CANARY_TEXT.encode("utf-16-le"), CANARY.hex().encode(), b"patient-0042"):
        assert form not in received


def test_a_second_run_finds_halt_and_budget_where_the_first_left_them(tmp_path: Path) -> None:
    from fedgate.policy import default_policy_text

    policy = tmp_path / "policy.toml"
    policy.write_text(default_policy_text().replace('on_refusal = "continue"', 'on_refusal = "halt"'))
    out = tmp_path / "run"
    common = ("--client-app", "malicious_apps:app", "--server-app", "canary_server_app:app", "--hospitals", "2",
              "--rounds", "1", "--policy", str(policy), "--out", str(out))  # fmt: skip
    first = fedgate("run", *common, "-c", "attacks=nan,honest", "-c", f"capture-file={tmp_path / 'a.bin'}")
    assert first.returncode == 0, first.stdout + first.stderr
    second = fedgate("run", *common, "-c", "attacks=honest,honest", "-c", f"capture-file={tmp_path / 'b.bin'}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "continuing with the same hospitals" in second.stdout
    summary = json.loads((out / "summary.json").read_text())
    rules = {r["rule"] for r in summary["refusals"].get("hospital-0", [])}
    assert rules == {"halted"}  # a new run id does not clear the halt
    assert "hospital-1" not in summary["refusals"]
    assert len(list((out / "runs").iterdir())) == 2


def test_the_server_side_cannot_reach_the_hospitals_in_simulation(tmp_path: Path) -> None:
    """Red-team finding: the research team's ServerApp, run by `fedgate run` on the hospital's
    machine, read every hospital's signing key and rewrote its gate state. It now runs in a
    sandbox of its own: no hospital folder, no network but its own loopback, no relay token."""
    import socket as sockets

    out = tmp_path / "run"
    host_ip = sockets.gethostbyname(sockets.gethostname())
    # The test apps (no torch, no images): what the server side can reach is all that is tested here.
    honest = ("--client-app", "malicious_apps:app", "--hospitals", "1", "--rounds", "1", "--out", str(out))
    first = fedgate("run", *honest, "--server-app", "canary_server_app:app", "-c", "capture-file=first.bin")
    assert first.returncode == 0, first.stdout + first.stderr  # hospital-0 exists, with its key
    fedgate(  # its ServerApp runs no round: what it tried is all that counts
        "run", *honest, "--server-app", "evil_server_app:app", "-c", f"probe-host={host_ip}",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    escapes = json.loads((out / "runs" / str(summary["run_id"]) / "escapes.json").read_text())
    assert all(value.startswith("held") for value in escapes.values()), escapes
    assert not (out / "hospital-0" / "ledger" / "planted").exists()
    verify_ledger(out / "hospital-0" / "ledger")


def test_no_isolation_says_so_everywhere(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = fedgate(  # the test apps (no torch, no images): only what is said about isolation is tested here
        "run", "--client-app", "malicious_apps:app", "--server-app", "canary_server_app:app", "--hospitals", "2",
        "--rounds", "1", "-c", "capture-file=received.bin", "--no-isolation", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NOTHING IS ENFORCED" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["isolation"]["hospital-0"] == {"modes": ["no-isolation"], "enforced": False}


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["run", "--hospitals", "0"], "--hospitals must be at least 1"),
        (["run", "--client-app", "no_such_module:app"], "no_such_module"),
        (["run", "--client-app", "fedgate_medical.task:AppConfig"], "not a flwr.clientapp.ClientApp"),
        (["run", "--client-app", "fedgate_medical.client_app"], "MODULE:ATTR"),
        (["run", "--policy", str(tmp_path / "missing.toml")], "fedgate policy init"),
        (["run", "-c", "subsett=300"], "did you mean subset"),
        (["run", "--out", str(tmp_path / "a-file" / "out")], "is a file"),
    ]
    for args, message in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "out")]
        result = fedgate(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_host_path_the_sandboxes_cannot_see_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "scans.npz").write_bytes(b"x")
    result = fedgate("run", "-c", f"dataset=npz:{tmp_path / 'scans.npz'}", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "--data" in result.stderr, result.stderr


def test_corrupt_dataset_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    broken = data / "broken.npz"
    broken.write_bytes(b"not a zip at all")
    result = fedgate(
        "run", "--hospitals", "2", "--rounds", "1", "-c", f"dataset=npz:{broken}", "--data", str(data),
        "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a readable .npz" in result.stderr
    assert "Traceback" not in result.stderr


# "first-round" stops it while the hospitals train and their gates write; "later" (after a whole
# round, the same code paths again) is in the slow run.
@pytest.mark.parametrize("moment", ["starting", "first-round", pytest.param("later", marks=pytest.mark.slow)])
def test_ctrl_c_stops_everything_and_leaves_ledgers_that_verify(tmp_path: Path, moment: str) -> None:
    """SIGINT to the command at different moments: it stops, no process it started is left,
    every ledger verifies. (How fast: benchmarks/interrupt.py.)"""
    from fedgate.sandbox import procs

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgate.cli.main", "run", "--hospitals", "2", "--rounds", "3", "-c", "subset=200",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    waited_for = {"starting": "starting the sandboxes", "first-round": "initial model", "later": "round   1/3"}[moment]
    seen = ""
    assert proc.stdout is not None
    while waited_for not in seen:
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    family = [proc.pid, *procs.descendants(proc.pid)]
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, seen + rest
    assert "no process left" in rest, rest
    deadline = time.monotonic() + 30
    while [p for p in family if procs.alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p for p in family if procs.alive(p)] == []
    for ledger in out.glob("hospital-*/ledger"):
        verify_ledger(ledger)
