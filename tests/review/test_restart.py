"""Kill the review page and the node while a reply is pending: on restart it is still
pending, and approving it then sends it (once, with one ledger record of the approval)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from browser import env, review_page
from fedgate.ledger.store import Ledger
from fedgate.review.queue import PENDING, ReviewQueue

NODE = Path(__file__).with_name("review_node.py")


def start_node(folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(NODE), str(folder)], stdout=subprocess.PIPE, text=True, env=env())


def wait_pending(folder: Path, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (folder / "review.sqlite").exists():
            queue = ReviewQueue(folder)
            pending = queue.items(PENDING)
            queue.close()
            if pending:
                return pending[0].id
        time.sleep(0.1)
    raise AssertionError("no pending review item appeared")


def test_pending_reply_survives_a_restart_of_page_and_node(tmp_path: Path) -> None:
    folder = tmp_path / "hospital-0"
    node = start_node(folder)
    item_id = wait_pending(folder)
    with review_page(tmp_path) as (base, token, page):
        assert httpx.get(f"{base}/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        page.kill()  # the page dies ...
    node.kill()  # ... and so does the node, while the reply is pending
    node.wait()

    queue = ReviewQueue(folder)
    assert [i.id for i in queue.items(PENDING)] == [item_id]
    queue.close()

    node = start_node(folder)  # the node comes back and waits on the same item
    time.sleep(1.0)
    assert wait_pending(folder) == item_id
    with review_page(tmp_path) as (base, token, _):
        headers = {"Authorization": f"Bearer {token}"}
        html = httpx.get(f"{base}/items/hospital-0/{item_id}", headers=headers).text
        assert ">(pending)<" in html  # the heading shows the state, not just a CSS class name
        csrf = html.split('name="csrf" value="')[1].split('"')[0]
        form = {"action": "approve", "reviewer": "Dr Restart", "reason": "after the outage", "csrf": csrf}
        response = httpx.post(f"{base}/items/hospital-0/{item_id}/decision", data=form, headers=headers)
        assert response.status_code in (200, 303)
        output, _ = node.communicate(timeout=60)
    assert json.loads(output) == {"sent": True, "rule": ""}
    with Ledger(folder / "ledger", create=False) as ledger:
        entries = ledger.entries()
    reviews = [e for e in entries if e["kind"] == "review-decision"]
    assert [(e["status"], e["reviewer"]) for e in reviews] == [("approved", "Dr Restart")]
    assert [e["kind"] for e in entries].count("reply-sent") == 1
