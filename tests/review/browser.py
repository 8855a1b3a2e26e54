"""Helpers for the browser tests: a free port, the review page as a process, Chromium."""

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


def chromium_or_skip() -> None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (make test installs it when run as root)")
