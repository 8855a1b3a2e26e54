"""The review page's access control, without a browser: the token, its cookie, CSRF tokens
bound to the item, Origin / Sec-Fetch-Site checks and headers that forbid framing. Each test
here fails if its check is removed from `fedgate.review.app`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from holding import AUTH, TOKEN, csrf_of, hold, page, wait_pending

from conftest import gate_for, instruction
from fedgate.review.queue import APPROVED, PENDING, ReviewQueue
from malicious_apps import honest


@pytest.fixture
def pending(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A real held reply: the gate waits on another thread. Afterwards the item is decided (if the
    test left it pending) and that thread is joined: a gate thread left waiting would still hold
    its locks when a later test forks (the sandbox's outside controls), and the child could hang."""
    held = hold(gate_for(tmp_path, review_mode="always", review_timeout_s=120.0), instruction(), honest)
    [item] = wait_pending(tmp_path / "hospital-0")
    yield tmp_path, item.id
    end_hold(tmp_path, item.id, held)


def end_hold(root: Path, item_id: int, held: Any) -> None:
    queue = ReviewQueue(root / "hospital-0")
    try:
        current = queue.get(item_id)
        if current is not None and current.status == PENDING:
            queue.decide(item_id, False, "pytest", "test over")
    finally:
        queue.close()
    held.thread.join(timeout=60)


def status(root: Path, item_id: int) -> str:
    queue = ReviewQueue(root / "hospital-0")
    try:
        item = queue.get(item_id)
        assert item is not None
        return item.status
    finally:
        queue.close()


def test_every_request_needs_the_token(pending: tuple[Path, int]) -> None:
    root, item_id = pending
    with page(root) as client:
        for path in ("/", f"/items/hospital-0/{item_id}"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert client.get(f"{path}?token=wrong").status_code == 401
            assert client.get(path, headers=AUTH).status_code == 200
        form = {"action": "approve", "reviewer": "Mallory", "csrf": "0" * 64}
        assert client.post(f"/items/hospital-0/{item_id}/decision", data=form).status_code == 401
    assert status(root, item_id) == PENDING


def test_the_token_link_sets_a_strict_http_only_cookie_and_leaves_the_address_bar(pending: tuple[Path, int]) -> None:
    root, _ = pending
    with page(root) as client:
        response = client.get(f"/?token={TOKEN}", follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN.lower() in cookie
        assert client.get("/").status_code == 200  # the cookie alone now suffices
        client.cookies.clear()
        assert client.get("/").status_code == 401


def test_a_decision_needs_the_csrf_token_of_that_item(pending: tuple[Path, int]) -> None:
    root, item_id = pending
    queue = ReviewQueue(root / "hospital-0")
    other = queue.submit("another-instruction", "hospital-0", {"round": 1, "decision": {}}, b"x", 60)
    queue.close()
    with page(root) as client:
        url = f"/items/hospital-0/{item_id}/decision"
        form = {"action": "approve", "reviewer": "Mallory", "csrf": "0" * 64}
        assert client.post(url, data=form, headers=AUTH).status_code == 403
        other_csrf = csrf_of(client.get(f"/items/hospital-0/{other.id}", headers=AUTH).text)
        assert client.post(url, data={**form, "csrf": other_csrf}, headers=AUTH).status_code == 403
        assert status(root, item_id) == PENDING
        csrf = csrf_of(client.get(f"/items/hospital-0/{item_id}", headers=AUTH).text)
        ok = client.post(url, data={**form, "csrf": csrf}, headers=AUTH, follow_redirects=False)
        assert ok.status_code == 303
    assert status(root, item_id) == APPROVED


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
def test_a_cross_site_post_is_refused_even_with_a_valid_csrf_token(
    pending: tuple[Path, int], headers: dict[str, str]
) -> None:
    root, item_id = pending
    with page(root) as client:
        csrf = csrf_of(client.get(f"/items/hospital-0/{item_id}", headers=AUTH).text)
        form = {"action": "approve", "reviewer": "Mallory", "csrf": csrf}
        response = client.post(f"/items/hospital-0/{item_id}/decision", data=form, headers={**AUTH, **headers})
        assert response.status_code == 403
        same = {"Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "same-origin"}
        response = client.post(
            f"/items/hospital-0/{item_id}/decision", data=form, headers={**AUTH, **same}, follow_redirects=False
        )
        assert response.status_code == 303
    assert status(root, item_id) == APPROVED


def test_no_page_can_be_framed_or_cached(pending: tuple[Path, int]) -> None:
    root, item_id = pending
    with page(root) as client:
        for response in (client.get("/"), client.get("/", headers=AUTH), client.get(f"/items/hospital-0/{item_id}",
                                                                                    headers=AUTH)):  # fmt: skip
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["referrer-policy"] == "same-origin"


def test_the_item_page_shows_the_hash_of_the_bytes_and_what_they_hold(pending: tuple[Path, int]) -> None:
    root, item_id = pending
    queue = ReviewQueue(root / "hospital-0")
    item = queue.get(item_id)
    queue.close()
    assert item is not None
    with page(root) as client:
        html = client.get(f"/items/hospital-0/{item_id}", headers=AUTH).text
    assert f'<code id="payload-sha256">{hashlib.sha256(item.payload).hexdigest()}</code>' in html
    assert "Approving sends exactly these bytes" in html
    for name in ("conv.weight", "conv.bias", "fc.weight", "steps", "train-loss", "num-examples"):
        assert f"<td>{name}</td>" in html  # read from the payload's bytes
    assert 'id="form-approve"' in html and "Other records" not in html


def test_an_item_the_gate_never_held_cannot_be_approved(tmp_path: Path) -> None:
    """A queue row written by someone else (no ledger entry): shown as such, approval refused."""
    queue = ReviewQueue(tmp_path / "hospital-0")
    item = queue.submit("forged", "hospital-0", {"round": 1, "decision": {}}, b"not a record", 60)
    queue.close()
    with page(tmp_path) as client:
        html = client.get(f"/items/hospital-0/{item.id}", headers=AUTH).text
        assert "Cannot check these bytes against the gate's ledger" in html
        assert "cannot be read as a Flower record" in html and 'id="form-approve"' not in html
        form = {"action": "approve", "reviewer": "Mallory", "csrf": csrf_of(html)}
        response = client.post(f"/items/hospital-0/{item.id}/decision", data=form, headers=AUTH)
        assert response.status_code == 409
    assert status(tmp_path, item.id) == PENDING


def test_an_epsilon_the_client_app_reports_is_marked_as_its_claim(tmp_path: Path) -> None:
    from flwr.app import Message, MetricRecord, RecordDict

    from fedgate.policy.model import MetricRule

    rules = dict(gate_for(tmp_path / "probe").policy.metrics)
    rules["epsilon"] = MetricRule(step=0.1, min=0.0, max=100.0, types=("train",))
    gate = gate_for(tmp_path, review_mode="always", review_timeout_s=120.0, metrics=tuple(sorted(rules.items())))

    def claims_privacy(ins: Message) -> Message:
        records = dict(honest(ins).content.items())
        records["metrics"] = MetricRecord({"train-loss": 0.4, "num-examples": 123, "epsilon": 0.5})
        return Message(RecordDict(records), reply_to=ins)  # type: ignore[arg-type]

    held = hold(gate, instruction(), claims_privacy)
    [item] = wait_pending(tmp_path / "hospital-0")
    try:
        with page(tmp_path) as client:
            html = client.get(f"/items/hospital-0/{item.id}", headers=AUTH).text
    finally:
        end_hold(tmp_path, item.id, held)
    epsilon_row = html[html.index("<td>epsilon</td>") :].split("</tr>")[0]
    assert "claimed by the research team" in epsilon_row and "not enforced" in epsilon_row
    loss_row = html[html.index("<td>train-loss</td>") :].split("</tr>")[0]
    assert "claimed" not in loss_row
