"""The DPO report as a reader sees it: opened in headless Chromium for a clean run, a tampered
ledger, z = 0, a rejected review, two runs in one folder and a downgraded sandbox. Each test
saves a full-page screenshot under its tmp folder (the path is printed; `pytest -s` shows it)
and asserts on the text Chromium renders."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ledgers
import pytest

from browser import chromium
from fedgate.ledger.verify import verify_ledger
from fedgate.report.render import write_report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


def open_report(browser: Any, hospital: Path, tmp_path: Path, name: str) -> tuple[Any, str]:
    """Write the report, open it, screenshot it; return the page and its visible text."""
    report = write_report(hospital, tmp_path / f"{name}.html")
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.goto(report.as_uri())
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    return page, page.inner_text("body")


def first_line(page: Any) -> str:
    return str(page.evaluate("document.body.firstElementChild.innerText"))


def figures_decoded(page: Any) -> int:
    images = page.locator("img")
    for index in range(images.count()):
        assert images.nth(index).evaluate("img => img.complete && img.naturalWidth > 100")
    return int(images.count())


def test_clean_run(browser: Any, tmp_path: Path) -> None:
    hospital = ledgers.clean(tmp_path / "ledger")
    page, text = open_report(browser, hospital, tmp_path, "clean")
    headings = page.locator("h1, h2, h3").all_inner_texts()
    for section in ("What left hospital-0", "Run 4242", "The bound", "Figures", "Replies, one by one",
                    "Human review", "Policy in force", "Privacy of each patient (ε)", "Data protection",
                    "Keep this signed tree head"):  # fmt: skip
        assert any(h.startswith(section) for h in headings) or section in text, (section, headings)
    assert first_line(page).startswith("Key not pinned")  # no warning above it: nothing is wrong
    assert "does NOT verify" not in text and "UNBOUNDED" not in text and "NOT ISOLATED" not in text
    assert "Ledger verified" in text and "of any content per reply" in text and "patient identifiers" in text
    assert "sandbox enforced" in text and "REFUSED (config-record): kept at the hospital" in text
    assert figures_decoded(page) == 3  # replies, bytes and bound; review: skipped, and said so
    assert "No reply of this run was held for human review: no plot." in text
    kept = json.loads(page.locator("#trusted-head").inner_text())  # what the DPO copies into head.json
    assert kept == verify_ledger(hospital / "ledger").latest_head.to_json()
    assert "pass it as --trusted-head head.json" in text
    assert "no images" not in text.lower() and "no identifiers" not in text.lower()
    page.close()


def test_tampered_ledger(browser: Any, tmp_path: Path) -> None:
    page, text = open_report(browser, ledgers.tampered(tmp_path / "ledger"), tmp_path, "tampered")
    line = first_line(page)
    assert line.startswith("WARNING: this ledger does NOT verify") and "first broken entry: 2" in line
    assert page.locator("#verification").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(170, 17, 17)"
    assert "No signed tree head to keep" in text and page.locator("#trusted-head").count() == 0
    page.close()


def test_z_zero(browser: Any, tmp_path: Path) -> None:
    page, text = open_report(browser, ledgers.unbounded(tmp_path / "ledger"), tmp_path, "unbounded")
    assert first_line(page).startswith("The bound in this report does not hold as stated")
    assert "Run 4242: UNBOUNDED" in page.locator("#warnings").inner_text()
    assert "there is NO bound on what could have left" in text and "inf bits" not in text
    assert "Unbounded (z = 0): a reply could carry anything" in text  # the bound figure, skipped
    assert "clipped and noised" not in text
    page.close()


def test_rejected_review(browser: Any, tmp_path: Path) -> None:
    page, text = open_report(browser, ledgers.rejected_review(tmp_path / "ledger"), tmp_path, "rejected")
    assert "Nothing left hospital-0" in text
    assert "REFUSED (review-rejected): kept at the hospital" in text
    reviews = page.locator("table.reviews").inner_text()
    assert "rejected" in reviews and "Dr Grace Hopper" in reviews and "the update norm looks odd" in reviews
    assert "No reply left in this run: no bytes to plot." in text
    assert figures_decoded(page) == 3  # replies (refused), bound, review decisions
    page.close()


def test_two_runs_in_one_folder(browser: Any, tmp_path: Path) -> None:
    page, text = open_report(browser, ledgers.two_runs(tmp_path / "ledger"), tmp_path, "two-runs")
    sections = page.locator("section.run")
    assert sections.count() == 2
    first, second = sections.nth(0).inner_text(), sections.nth(1).inner_text()
    assert first.startswith("Run 1001") and second.startswith("Run 2002")
    assert "NOT ISOLATED" not in first and "sandbox enforced" in first
    assert "Run 2002: NOT ISOLATED" in second and "no isolation: 2 replies" in second
    assert "Run 2002: NOT ISOLATED" in page.locator("#warnings").inner_text()
    assert "2 runs between" in text
    page.close()


@pytest.mark.parametrize(
    "isolation", [ledgers.DOWNGRADED, ledgers.SANDBOX_NOT_ENFORCED], ids=["mode-downgraded", "sandbox-not-enforced"]
)
def test_downgraded_sandbox(browser: Any, tmp_path: Path, isolation: dict[str, Any]) -> None:
    build: Callable[[Path], Path] = lambda folder: ledgers.downgraded(folder, isolation)  # noqa: E731
    page, text = open_report(browser, build(tmp_path / "ledger"), tmp_path, "downgraded")
    assert first_line(page).startswith("The bound in this report does not hold as stated")
    assert "Run 4242: SANDBOX DOWNGRADED for 2 replies" in page.locator("#warnings").inner_text()
    assert "sandbox downgraded: 2 replies" in text and "It does NOT hold for the 2 replies" in text
    page.close()
