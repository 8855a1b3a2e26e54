"""The review page in real headless Chromium (Debian's, driven by Playwright), served by
`fedgate review`: a person sees the hash of the bytes the gate held, approves one reply and
rejects another; a queue row someone swapped cannot be approved. Without Chromium these fail
in CI and skip elsewhere (the access-control tests need no browser: test_page.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from holding import Held, blob, held_entries, hold, reply_entries, wait_pending

import browser as browser_helpers
from browser import chromium, chromium_or_skip, env, review_page
from conftest import instruction, policy_with
from fedgate.flower_adapter import recorddict_to_bytes
from fedgate.gate.pipeline import GatePipeline
from fedgate.ledger.store import Ledger
from fedgate.policy import default_policy_text
from malicious_apps import honest

WAIT_S = 90.0  # a safety net for a hung test, not a measurement


def outcome_of_chromium_check() -> tuple[str, str]:
    """What `chromium_or_skip` did, caught here so that a skip cannot pass for a failure."""
    try:
        chromium_or_skip()
    except pytest.fail.Exception as err:
        return "failed", str(err)
    except pytest.skip.Exception as err:
        return "skipped", str(err)
    return "ran", ""


def test_without_chromium_browser_tests_fail_in_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_helpers, "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "true")
    verdict, why = outcome_of_chromium_check()
    assert verdict == "failed" and "CI is set and the browser tests cannot run" in why
    monkeypatch.delenv("CI")
    verdict, why = outcome_of_chromium_check()
    assert verdict == "skipped" and "chromium is not installed" in why


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


def holding_gate(folder: Path, name: str) -> GatePipeline:
    policy = policy_with(review_mode="always", review_timeout_s=120.0)
    return GatePipeline(policy, folder / name, name, "https://superlink.example:9092")


def open_item(page: Any, base: str, hospital: str) -> None:
    page.goto(f"{base}/")
    page.click(f"#pending tr:has-text('{hospital}') a")
    page.wait_for_selector("#payload-sha256")


def decide(page: Any, base: str, action: str, reviewer: str, reason: str) -> None:
    form = page.locator(f"#form-{action}")
    form.locator("input[name=reviewer]").fill(reviewer)
    form.locator("input[name=reason]").fill(reason)
    form.locator("button").click()
    page.wait_for_url(f"{base}/")


@pytest.mark.browser
def test_a_person_approves_exactly_the_held_bytes_and_rejects_another(browser: Any, tmp_path: Path) -> None:
    gates = {name: holding_gate(tmp_path, name) for name in ("hospital-0", "hospital-1")}
    held: dict[str, Held] = {name: hold(gate, instruction(), honest) for name, gate in gates.items()}
    for name in gates:
        wait_pending(tmp_path / name)
    with review_page(tmp_path) as (base, token, _):
        anonymous = browser.new_page()
        assert anonymous.goto(f"{base}/").status == 401
        assert anonymous.goto(f"{base}/?token=wrong").status == 401
        anonymous.close()

        page = browser.new_page(viewport={"width": 1100, "height": 1200})
        page.goto(f"{base}/?token={token}")
        assert page.url == f"{base}/"  # the token left the address bar for a cookie
        assert page.locator("#pending tr").count() == 3  # header + one per hospital
        open_item(page, base, "hospital-0")
        [held0] = held_entries(tmp_path / "hospital-0")
        assert page.inner_text("#payload-sha256") == held0.payload_sha256  # the hash the gate recorded
        assert "exactly the bytes the gate held" in page.inner_text("#held")
        assert page.locator("#tensors tr").count() == 5  # header + the 4 tensors, read from the bytes
        assert "conv.weight" in page.inner_text("#tensors") and "train-loss" in page.inner_text("#metrics")
        shot = tmp_path / "review-item.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        decide(page, base, "approve", "Dr Ada Lovelace", "the hash and the tensor table match")
        open_item(page, base, "hospital-1")
        decide(page, base, "reject", "Dr Grace Hopper", "not this round")
        decided = page.inner_text("#decided")
        assert "approved" in decided and "rejected" in decided and "Dr Ada Lovelace" in decided
        page.close()

    sent = held["hospital-0"].outcome()
    assert sent.decision.sent and sent.message is not None
    assert recorddict_to_bytes(sent.message.content) == blob(tmp_path / "hospital-0", held0.payload_sha256)
    refused = held["hospital-1"].outcome()
    assert refused.decision.rule == "review-rejected" and refused.message is not None and refused.message.has_error()
    assert [r.sent for r in reply_entries(tmp_path / "hospital-1")] == [False]


@pytest.mark.browser
def test_a_swapped_queue_row_is_shown_red_and_cannot_be_approved(browser: Any, tmp_path: Path) -> None:
    import sqlite3

    from flwr.app import ConfigRecord

    from fedgate.flower_adapter import recorddict_from_bytes
    from malicious_apps import CANARY

    held = hold(holding_gate(tmp_path, "hospital-0"), instruction(), honest)
    [item] = wait_pending(tmp_path / "hospital-0")
    content = recorddict_from_bytes(item.payload)
    content["extra"] = ConfigRecord({"image": CANARY})
    swapped = recorddict_to_bytes(content)
    with sqlite3.connect(tmp_path / "hospital-0" / "review.sqlite") as db:
        db.execute("UPDATE items SET payload = ? WHERE id = ?", (swapped, item.id))
    with review_page(tmp_path) as (base, token, _):
        page = browser.new_page(viewport={"width": 1100, "height": 1200})
        page.goto(f"{base}/?token={token}")
        open_item(page, base, "hospital-0")
        assert page.inner_text("#payload-sha256") == hashlib.sha256(swapped).hexdigest()
        assert "NOT the bytes the gate held" in page.inner_text("#held")
        assert page.locator("#held").evaluate("e => getComputedStyle(e).color") == "rgb(170, 17, 17)"
        assert page.locator("#form-approve").count() == 0 and "extra" in page.inner_text("#other-records")
        shot = tmp_path / "review-swapped.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        decide(page, base, "reject", "Dr Ada Lovelace", "the payload was swapped")
        page.close()
    assert held.outcome().decision.rule == "review-rejected"


def start_federation(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    policy = tmp_path / "policy.toml"
    policy.write_text(default_policy_text().replace('mode = "never"', 'mode = "always"'))
    out, capture = tmp_path / "run", tmp_path / "server-received.bin"
    cmd = [
        sys.executable, "-m", "fedgate.cli.main", "run", "--client-app", "malicious_apps:app",
        "--server-app", "canary_server_app:app", "--hospitals", "2", "--rounds", "1", "--policy", str(policy),
        "--out", str(out), "-c", "attacks=honest", "-c", "phases=train:1", "-c", f"capture-file={capture}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    return proc, out, capture


def wait_for_pending(page: Any, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        page.reload()
        if page.locator("#pending tr").count() - 1 >= count:  # minus the header row
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} pending replies:\n{page.content()}")


@pytest.mark.slow
@pytest.mark.browser
def test_review_in_a_gated_federation(browser: Any, tmp_path: Path) -> None:
    """End to end: `fedgate run` (Ray simulation, sandboxed ClientApps) waits for the page."""
    proc, out, capture = start_federation(tmp_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with review_page(out) as (base, token, _):
            page = browser.new_page()
            page.goto(f"{base}/?token={token}")
            wait_for_pending(page, 2)
            open_item(page, base, "hospital-0")
            decide(page, base, "approve", "Dr Ada Lovelace", "tensor table matches the model")
            open_item(page, base, "hospital-1")
            decide(page, base, "reject", "Dr Grace Hopper", "not this round")
        output, _ = proc.communicate(timeout=WAIT_S * 2)
        assert proc.returncode == 0, output
    finally:
        proc.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["egress"]["hospital-0"]["replies_sent"] == 1
    assert [r["rule"] for r in summary["refusals"]["hospital-1"]] == ["review-rejected"]
    [sent] = reply_entries(out / "hospital-0")
    with Ledger(out / "hospital-0" / "ledger", create=False) as ledger:
        sent_bytes = ledger.blobs.get(sent.payload_sha256)
    assert sent.payload_sha256 == held_entries(out / "hospital-0")[0].payload_sha256
    received = capture.read_bytes()
    assert sent_bytes[:2000] in received
    assert b"refused by the hospital's egress gate" in received
