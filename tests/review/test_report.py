"""The DPO report: opens in Chromium with its sections, and says so first when tampered."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from browser import CHROMIUM, CHROMIUM_ARGS, chromium_or_skip
from conftest import instruction
from fedgate.gate.pipeline import GatePipeline
from fedgate.policy import load_policy
from fedgate.report.render import render_report, write_report
from malicious_apps import ATTACKS, honest

SECTIONS = ["What left", "Guarantees", "Figures", "Replies, round by round", "Human review", "Policy in force",
            "Data protection"]  # fmt: skip


@pytest.fixture
def hospital(tmp_path: Path) -> Path:
    gate = GatePipeline(load_policy(None), tmp_path / "hospital-0", "hospital-0", "https://superlink.example:9092")
    for server_round in (1, 2, 3):
        ins = instruction(server_round=server_round)
        gate.process(ins, honest(ins))
    ins = instruction(server_round=4)
    gate.process(ins, ATTACKS["config-record"](ins))
    gate.close()
    return tmp_path / "hospital-0"


def test_report_states_what_left_first(hospital: Path) -> None:
    html = render_report(hospital)
    first_lines = html.split("<h2")[0]
    assert "3 model updates left hospital-0 for https://superlink.example:9092" in first_lines
    assert "1 reply was refused and never sent" in first_lines
    assert "Ledger verified" in first_lines
    assert "config-record" in html  # the refusal's rule, in the round table
    assert html.count("data:image/png;base64,") == 4  # self-contained: plots inline
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing fetched from elsewhere


def test_tampered_ledger_is_announced_in_the_first_lines(hospital: Path) -> None:
    with sqlite3.connect(hospital / "ledger" / "ledger.sqlite") as conn:
        raw = conn.execute("SELECT entry FROM entries WHERE seq = 2").fetchone()[0]
        conn.execute("UPDATE entries SET entry = ? WHERE seq = 2", (raw.replace(b'"round":2', b'"round":7'),))
    html = render_report(hospital)
    body = html.split("<body>")[1]
    assert body.lstrip().startswith('<p class="tampered" id="verification">WARNING: this ledger does NOT verify')
    assert "first broken entry: 2" in body[:600]


def test_report_opens_in_chromium_with_its_sections(hospital: Path, tmp_path: Path) -> None:
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    report = write_report(hospital, tmp_path / "report.html")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page: Any = browser.new_page(viewport={"width": 1100, "height": 1400})
        page.goto(report.as_uri())
        headings = page.locator("h1, h2").all_inner_texts()
        for section in SECTIONS:
            assert any(h.startswith(section) for h in headings), (section, headings)
        images = page.locator("img")
        assert images.count() == 4
        for index in range(4):  # each figure decoded and laid out
            assert images.nth(index).evaluate("img => img.naturalWidth") > 100
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 20_000
