"""The review page in real headless Chromium (Debian's, driven by Playwright), against a
running gated federation: approve one reply, reject another, refuse a request without token."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import CHROMIUM, CHROMIUM_ARGS, chromium_or_skip, env, review_page
from fedgate.ledger.store import Ledger
from fedgate.policy import default_policy_text

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def start_federation(tmp_path: Path, review_mode: str = "always") -> tuple[subprocess.Popen[str], Path, Path]:
    policy = tmp_path / "policy.toml"
    policy.write_text(default_policy_text().replace('mode = "never"', f'mode = "{review_mode}"'))
    out, capture = tmp_path / "run", tmp_path / "server-received.bin"
    cmd = [
        sys.executable, "-m", "fedgate.cli.main", "run", "--client-app", "malicious_apps:app",
        "--server-app", "canary_server_app:app", "--hospitals", "2", "--rounds", "1", "--policy", str(policy),
        "--out", str(out), "-c", "attacks=honest", "-c", "phases=train:1", "-c", f"capture-file={capture}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    return proc, out, capture


def wait_for_pending(page: Any, count: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.reload()
        if page.locator("#pending tr").count() - 1 >= count:  # minus the header row
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} pending replies after {timeout_s} s:\n{page.content()}")


def decide(page: Any, base: str, hospital: str, action: str, reviewer: str, reason: str) -> None:
    page.goto(f"{base}/")
    page.click(f"#pending tr:has-text('{hospital}') a")
    assert "conv.weight" in page.inner_text("#tensors")  # the tensor table the person decides on
    assert page.locator("#tensors tr").count() == 5  # header + the 4 tensors of the model
    assert "L2 norm of the update" in page.inner_text("#tensors")
    assert "bits" in page.inner_text("#facts") and "policy hash" in page.inner_text("#facts")
    form = page.locator(f"#form-{action}")
    form.locator("input[name=reviewer]").fill(reviewer)
    form.locator("input[name=reason]").fill(reason)
    form.locator("button").click()
    page.wait_for_url(f"{base}/")


def ledger_kinds(folder: Path) -> list[dict[str, Any]]:
    with Ledger(folder / "ledger", create=False) as ledger:
        return ledger.entries()


def test_approve_one_reject_another_and_token_is_required(browser: Any, tmp_path: Path) -> None:
    proc, out, capture = start_federation(tmp_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with review_page(out) as (base, token, _):
            anonymous = browser.new_page()
            assert anonymous.goto(f"{base}/").status == 401
            assert anonymous.goto(f"{base}/?token=wrong").status == 401
            anonymous.close()

            page = browser.new_page()
            page.goto(f"{base}/?token={token}")
            wait_for_pending(page, 2)
            page.screenshot(path=str(tmp_path / "pending.png"))
            decide(page, base, "hospital-0", "approve", "Dr Ada Lovelace", "tensor table matches the model")
            decide(page, base, "hospital-1", "reject", "Dr Grace Hopper", "not this round")
            assert "approved" in page.inner_text("#decided") and "rejected" in page.inner_text("#decided")
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    finally:
        proc.kill()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["egress"]["hospital-0"]["replies_sent"] == 1
    assert [r["rule"] for r in summary["refusals"]["hospital-1"]] == ["review-rejected"]

    approved = [e for e in ledger_kinds(out / "hospital-0") if e["kind"] == "review-decision"]
    rejected = [e for e in ledger_kinds(out / "hospital-1") if e["kind"] == "review-decision"]
    assert [(e["status"], e["reviewer"]) for e in approved] == [("approved", "Dr Ada Lovelace")]
    assert [(e["status"], e["reviewer"]) for e in rejected] == [("rejected", "Dr Grace Hopper")]
    kinds0 = [e["kind"] for e in ledger_kinds(out / "hospital-0")]
    assert kinds0.index("review-decision") < kinds0.index("reply-sent")  # recorded before it moved on

    # The ServerApp got hospital-0's model and only a generic refusal from hospital-1.
    with Ledger(out / "hospital-0" / "ledger", create=False) as ledger:
        sent = next(e for e in ledger.entries() if e["kind"] == "reply-sent")
        sent_bytes = ledger.blobs.get(sent["payloads"]["sent"]["sha256"])
    received = capture.read_bytes()
    assert sent_bytes[:2000] in received
    assert b"refused by the hospital's egress gate" in received


def test_cross_site_post_and_bad_csrf_are_refused(browser: Any, tmp_path: Path) -> None:
    import httpx

    from fedgate.review.queue import ReviewQueue

    queue = ReviewQueue(tmp_path / "hospital-0")
    item = queue.submit("instr-1", "hospital-0", {"round": 1, "tensors": [], "metrics": {}, "decision": {}}, b"x", 60)
    with review_page(tmp_path) as (base, token, _):
        headers = {"Authorization": f"Bearer {token}"}
        form = {"action": "approve", "reviewer": "Mallory", "csrf": "0" * 64}
        url = f"{base}/items/hospital-0/{item.id}/decision"
        assert httpx.post(url, data=form, headers=headers).status_code == 403
        good = httpx.get(f"{base}/items/hospital-0/{item.id}", headers=headers).text
        csrf = good.split('name="csrf" value="')[1].split('"')[0]
        evil = {**headers, "Origin": "http://evil.example"}
        assert httpx.post(url, data={**form, "csrf": csrf}, headers=evil).status_code == 403
        assert httpx.post(url, data={**form, "csrf": csrf}).status_code == 401  # no token
        assert queue.get(item.id).status == "pending"  # type: ignore[union-attr]
        ok = httpx.post(url, data={**form, "csrf": csrf}, headers=headers, follow_redirects=False)
        assert ok.status_code == 303
        assert queue.get(item.id).status == "approved"  # type: ignore[union-attr]
