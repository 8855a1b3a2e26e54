"""`fedgate ledger ...`: pinned keys, loud when not pinned, heads to keep, clean errors."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fedgate.cli.ledger_cmd import ledger_app
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger
from test_store import append_one, make_ledger


def run(*args: str | Path) -> Result:
    result = CliRunner().invoke(ledger_app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def flat(result: Result) -> str:
    return " ".join(result.output.split())  # rich may wrap long lines


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return make_ledger(tmp_path / "hospital-0" / "ledger", 4)


def test_verify_without_a_pin_says_so_loudly(ledger: Path) -> None:
    result = run("verify", ledger)
    assert result.exit_code == 0
    assert "key not pinned: trusting the key found beside the ledger" in flat(result)
    assert "ledger verifies" in flat(result)


def test_verify_pinned_by_fingerprint_or_key(ledger: Path, tmp_path: Path) -> None:
    fingerprint = verify_ledger(ledger).key_id
    for pin in (["--fingerprint", fingerprint.upper()], ["--public-key", ledger / "signing.pub"]):
        result = run("verify", ledger, *pin)
        assert result.exit_code == 0 and "not pinned" not in flat(result) and "(pinned)" in flat(result)
    other = make_ledger(tmp_path / "other", 1)
    result = run("verify", ledger, "--public-key", other / "signing.pub")
    assert result.exit_code == 1 and "DOES NOT VERIFY" in flat(result)
    result = run("verify", ledger, "--fingerprint", verify_ledger(other).key_id)
    assert result.exit_code == 1 and "not the pinned" in flat(result)


def test_the_hospital_folder_is_accepted_too(ledger: Path) -> None:
    assert run("verify", ledger.parent).exit_code == 0


def test_head_is_the_next_trusted_head_and_catches_a_truncation(ledger: Path, tmp_path: Path) -> None:
    fingerprint = verify_ledger(ledger).key_id
    result = run("head", ledger, "--fingerprint", fingerprint)
    assert result.exit_code == 0
    head = json.loads(result.stdout)
    assert head["size"] == 4 and head["key_id"] == fingerprint and len(head["signature"]) == 128
    kept = tmp_path / "head.json"
    kept.write_text(result.stdout)
    append_one(ledger)
    assert run("verify", ledger, "--fingerprint", fingerprint, "--trusted-head", kept).exit_code == 0
    assert run("consistency", kept, ledger, "--fingerprint", fingerprint).exit_code == 0
    with sqlite3.connect(ledger / "ledger.sqlite") as conn:
        conn.execute("DELETE FROM entries WHERE seq >= 2")
    result = run("verify", ledger, "--fingerprint", fingerprint, "--trusted-head", kept)
    assert result.exit_code == 1 and "DOES NOT VERIFY" in flat(result)


def test_consistency_reports_a_proof_that_checks(ledger: Path, tmp_path: Path) -> None:
    kept = tmp_path / "head.json"
    kept.write_text(run("head", ledger).stdout)
    for note in ("a", "b", "c"):
        append_one(ledger, note)
    result = run("consistency", kept, ledger, "--public-key", ledger / "signing.pub")
    assert result.exit_code == 0
    assert "consistent" in flat(result) and "extends the old tree of 4" in flat(result)
    document = json.loads(run("consistency", kept, ledger, "--public-key", ledger / "signing.pub", "--json").stdout)
    assert document["new_head"]["size"] == 7 and document["proof"]


@pytest.mark.parametrize("content", ["not json", "{}", '{"size": 1.5}', "[]"])
def test_a_malformed_trusted_head_file_is_a_clean_error(ledger: Path, tmp_path: Path, content: str) -> None:
    kept = tmp_path / "head.json"
    kept.write_text(content)
    result = run("verify", ledger, "--trusted-head", kept)
    assert result.exit_code == 2 and "error" in flat(result)
    assert run("consistency", kept, ledger).exit_code == 2


def test_check_proof_requires_a_pin(ledger: Path, tmp_path: Path) -> None:
    proof = tmp_path / "proof.json"
    proof.write_text(run("prove", ledger, "2").stdout)
    result = run("check-proof", proof)
    assert result.exit_code == 2 and "--public-key" in flat(result)
    assert run("check-proof", proof, "--fingerprint", verify_ledger(ledger).key_id).exit_code == 0
    assert run("check-proof", proof, "--public-key", ledger / "signing.pub").exit_code == 0
    document = json.loads(proof.read_text())
    document["entry"] = document["entry"].replace("entry 2", "entry 3")
    proof.write_text(json.dumps(document))
    result = run("check-proof", proof, "--fingerprint", verify_ledger(ledger).key_id)
    assert result.exit_code == 1 and "PROOF DOES NOT CHECK" in flat(result)


def test_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    assert "holds no ledger" in flat(run("verify", tmp_path))
    assert "public key missing" not in flat(run("verify", tmp_path))
    assert run("verify", tmp_path).exit_code == 2
    assert run("show", tmp_path).exit_code == 2
    assert run("prove", tmp_path, "0").exit_code == 2
    (tmp_path / "proof.json").write_text("{")
    assert run("check-proof", tmp_path / "proof.json", "--fingerprint", "00" * 32).exit_code == 2
    assert run("check-proof", tmp_path / "nope.json", "--fingerprint", "00" * 32).exit_code == 2


def test_show_is_wide_with_destination_reviewer_and_integer_bits(tmp_path: Path) -> None:
    folder = tmp_path / "l"
    with Ledger(folder) as ledger:
        ledger.append(
            {
                "kind": "reply-sent",
                "run_id": 3,
                "round": 2,
                "message_type": "train",
                "destination": "superlink.example-research-institute.org:9092",
                "decision": {"rule": "ok", "bound": {"total_bits": "7234.40821499"}},
            },
            {"sent": b"x" * 12345},
        )
        ledger.append({"kind": "review-decision", "round": 2, "status": "approved", "reviewer": "dr.jansen@hospital"})
        ledger.append({"kind": "reply-sent", "round": 3, "decision": {"rule": "ok", "bound": {"total_bits": "inf"}}})
    result = run("show", folder)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) > 80  # not cut at 80 columns
    text = result.output
    for expected in ("superlink.example-research-institute.org:9092", "dr.jansen@hospital", "approved", "7,234"):
        assert expected in text
    assert "7234.408" not in text and "12,345" in text and "unbounded" in text and "…" not in text
    rows = [json.loads(line) for line in run("show", folder, "--json").stdout.splitlines()]
    assert [r["seq"] for r in rows] == [0, 1, 2] and rows[1]["reviewer"] == "dr.jansen@hospital"
    assert [
        r["seq"] for r in (json.loads(x) for x in run("show", folder, "--json", "--round", "3").stdout.splitlines())
    ] == [2]


def test_export_then_verify_the_bundle(ledger: Path, tmp_path: Path) -> None:
    result = run("export", ledger, tmp_path / "bundle")
    assert result.exit_code == 0 and "exported 4 entries" in flat(result)
    assert run("verify", tmp_path / "bundle", "--fingerprint", verify_ledger(ledger).key_id).exit_code == 0
    assert run("export", ledger, tmp_path / "bundle").exit_code == 2
