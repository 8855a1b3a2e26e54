"""Helpers for the browser tests: a free port, the review page as a process, Chromium.

Where Chromium (or Playwright) is missing, a browser test fails when `CI` is set in the
environment — a CI run must not pass by skipping — and skips with the reason otherwise."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedgate.executor.local_federation import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TESTS = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS), "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "300"}


@contextmanager
def review_page(folder: Path) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """Start `fedgate review FOLDER`; yield (base URL, token, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "fedgate.cli.main", "review", str(folder), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"token=([\w-]+)", line)
    assert match, f"no token in {line!r}"
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield base, match.group(1), proc
    finally:
        proc.kill()
        proc.wait()


def chromium_missing() -> str:
    """Why the browser tests cannot run here, or "" when they can."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        return f"Debian's chromium is not installed at {CHROMIUM} (`make test` installs it when run as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as err:
        return f"playwright is not installed in this environment ({err})"
    return ""


def chromium_or_skip() -> None:
    """Fail in CI, skip (saying why) elsewhere, when Chromium cannot be driven here."""
    why = chromium_missing()
    if not why:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and the browser tests cannot run: {why}", pytrace=False)
    pytest.skip(f"{why}; in CI (CI set) this fails instead")


@contextmanager
def chromium() -> Iterator[Any]:
    """One headless Chromium (Debian's, driven by Playwright); share it per module, it is the slow part."""
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
