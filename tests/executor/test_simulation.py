"""End to end through Flower's simulation engine (Ray), via the `fedgate` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from malicious_apps import ATTACK_RULES, CANARY, CANARY_TEXT, check_refusals

TESTS = Path(__file__).resolve().parents[1]


def fedgate(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "fedgate.cli.main", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("ref")
    result = fedgate("run", "--hospitals", "3", "--rounds", "2", "-c", "subset=300", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "summary.json").read_text()), result.stdout


def test_summary_contract(reference_run: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = reference_run
    assert summary["hospitals"] == 3 and summary["rounds"] == 2
    assert [r["round"] for r in summary["per_round"]] == [0, 1, 2]
    for row in summary["per_round"]:
        assert set(row) == {"round", "loss", "accuracy", "auc"}
        assert 0.0 <= row["accuracy"] <= 1.0
    assert summary["final_accuracy"] == summary["per_round"][-1]["accuracy"]
    assert summary["final_auc"] == summary["per_round"][-1]["auc"]
    assert 0 < summary["seconds"] < 120
    assert summary["hospitals_dirs"] == [str(out / f"hospital-{i}") for i in range(3)]
    assert all(Path(d).is_dir() for d in summary["hospitals_dirs"])
    assert summary["refusals"] == {}
    for name in ("hospital-0", "hospital-1", "hospital-2"):
        assert summary["bits_per_reply"][name] > 0
        assert summary["bits_total"][name] > summary["bits_per_reply"][name]
        assert summary["egress"][name]["replies_sent"] == 4  # 2 rounds x (train + evaluate)


def test_progress_lines_and_final_table(reference_run: tuple[Path, dict[str, Any], str]) -> None:
    _, _, stdout = reference_run
    assert "round   1/2" in stdout and "round   2/2" in stdout
    assert "AUC" in stdout and "bits / train reply" in stdout


def test_every_hospital_ledger_verifies(reference_run: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = reference_run
    for i in range(3):
        result = fedgate("ledger", "verify", str(out / f"hospital-{i}"))
        assert result.returncode == 0, result.stdout
        assert "5 entries" in result.stdout  # the policy, then 2 rounds x (train + evaluate)


def test_malicious_hospitals_are_refused_others_go_on_and_the_canary_never_leaves(tmp_path: Path) -> None:
    attacks = list(ATTACK_RULES)
    capture = tmp_path / "server-received.bin"
    result = fedgate(
        "run", "--client-app", "malicious_apps:app", "--server-app", "canary_server_app:app",
        "--hospitals", str(len(attacks)), "--rounds", "2", "--out", str(tmp_path / "run"),
        "-c", f"attacks={','.join(attacks)}", "-c", f"capture-file={capture}",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    check_refusals(summary, attacks)
    received = capture.read_bytes()
    assert len(received) > 10_000  # the honest replies did arrive
    for form in (CANARY, CANARY_TEXT.encode("utf-16-le"), CANARY.hex().encode(), b"patient-0042"):
        assert form not in received


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    cases = [
        (["run", "--hospitals", "0"], "--hospitals must be at least 1"),
        (["run", "--client-app", "no_such_module:app"], "cannot import module 'no_such_module'"),
        (["run", "--client-app", "fedgate_medical.task:AppConfig"], "not a flwr.clientapp.ClientApp"),
        (["run", "--client-app", "fedgate_medical.client_app"], "MODULE:ATTR"),
        (["run", "--policy", str(tmp_path / "missing.toml")], "fedgate policy init"),
    ]
    for args, message in cases:
        result = fedgate(*args, "--out", str(tmp_path / "out"), timeout=60)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_corrupt_dataset_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip at all")
    result = fedgate(
        "run", "--hospitals", "2", "--rounds", "1", "-c", f"dataset=npz:{broken}", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a readable .npz" in result.stderr
    assert "Traceback" not in result.stderr
