"""`fedgate fab check`: what it prints, and exit 0 only for a FAB the node would install."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fab_builders import reference_fab, reference_with
from typer.testing import CliRunner, Result

from fedgate.cli.fab_cmd import fab_app


def run(*args: object) -> Result:
    return CliRunner().invoke(fab_app, ["check", *(str(a) for a in args)])


@pytest.fixture
def fab_file(tmp_path: Path) -> Path:
    path = tmp_path / "fedgate.fedgate-medical.0-1-0.fab"
    path.write_bytes(reference_fab())
    return path


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_reference_fab_prints_what_a_hospital_decides_on(fab_file: Path) -> None:
    result = run(fab_file)
    assert result.exit_code == 0, result.output
    sha = hashlib.sha256(reference_fab()).hexdigest()
    for expected in (
        f"sha256:{sha}",
        "fedgate-medical",
        "0.1.0",
        "fedgate_medical.client_app:app",
        "fedgate_medical.server_app:app",
        "fedgate_medical/client_app.py",
        "lr",
        "0.001",
        "ACCEPTED",
        f'approved = ["sha256:{sha}"]',
    ):
        assert expected in result.output, expected


def test_json_output_is_the_report(fab_file: Path) -> None:
    result = run(fab_file, "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["verdict"] == "accepted" and report["sha256"] == hashlib.sha256(reference_fab()).hexdigest()
    assert report["client_app"] == "fedgate_medical.client_app:app"


def test_refused_fab_exits_1_with_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "attack.fab"
    path.write_bytes(reference_with({"project.version": "0.1.0/../../../../ESCAPED"}))
    result = run(path)
    assert result.exit_code == 1
    assert "REFUSED" in result.output and "metadata-version" in result.output and "ESCAPED" in result.output
    assert json.loads(run(path, "--json").output)["rule"] == "metadata-version"


def test_policy_approval_list_decides(tmp_path: Path, fab_file: Path) -> None:
    sha = hashlib.sha256(reference_fab()).hexdigest()
    other = policy_file(tmp_path, f'[fab]\napproved = ["sha256:{"0" * 64}"]\n')
    result = run(fab_file, "--policy", other)
    assert result.exit_code == 1 and "fab-not-approved" in result.output
    assert "fedgate_medical/client_app.py" in result.output  # still shown, so the hospital can review it
    listed = policy_file(tmp_path, f'[update]\nclip_norm = 1.0\n\n[fab]\napproved = ["sha256:{sha}"]\n')
    result = run(fab_file, "--policy", listed)
    assert result.exit_code == 0 and "listed in the policy" in result.output


def test_policy_limits_apply(tmp_path: Path, fab_file: Path) -> None:
    result = run(fab_file, "--policy", policy_file(tmp_path, "[fab]\nmax_fab_bytes = 1000\n"), "--json")
    assert result.exit_code == 1 and json.loads(result.output)["rule"] == "fab-size"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[fab]\napproved = ["sha256:abc"]\n', "fab.approved[0]"),
        (f'[fab]\napproved = ["sha256:{"0" * 64}", "{"1" * 64}"]\n', "fab.approved[1]"),
        ("[fab]\nmax_files = true\n", "fab.max_files"),
        ("[fab]\nmax_ratio = 0\n", "fab.max_ratio"),
        ("[fab]\napprove = []\n", "unknown key(s) in [fab]: approve"),
        ("[fab\n", "cannot read policy"),
    ],
)
def test_bad_policy_is_a_usage_error(tmp_path: Path, fab_file: Path, text: str, message: str) -> None:
    result = run(fab_file, "--policy", policy_file(tmp_path, text))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    assert run(tmp_path / "nope.fab").exit_code == 2


def test_untrusted_text_cannot_drive_the_terminal(tmp_path: Path) -> None:
    path = tmp_path / "escape.fab"
    path.write_bytes(reference_with({"tool.flwr.app.config.note": "\x1b]0;owned\x07\x1b[2J\u202eevil"}))
    result = run(path)
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "\u202e" not in result.output and "\x07" not in result.output
    assert "\\x1b[2J" in result.output
    assert "\x1b" not in run(path, "--json").output


def test_help_teaches_how_to_get_and_approve_a_fab() -> None:
    result = CliRunner().invoke(fab_app, ["check", "--help"])
    text = " ".join(result.output.split())
    assert "flwr build" in text and "[fab] approved" in text and "sha256:" in text
