"""SIGKILL at random moments loses no returned append and leaves a ledger that verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger

APPENDER = Path(__file__).with_name("crash_appender.py")


@pytest.mark.parametrize(
    ("runs", "payload_bytes", "max_sleep_s"),
    [
        (50, 64 * 1024, 0.15),  # many small appends: kills land in SQLite commits and blob renames
        (12, 17 * 1024 * 1024, 0.04),  # large payloads take the threaded hash-while-writing path
    ],
)
def test_sigkill_loses_nothing_that_was_acknowledged(
    tmp_path: Path, runs: int, payload_bytes: int, max_sleep_s: float
) -> None:
    folder = tmp_path / "ledger"
    rng = random.Random(20261127)
    acknowledged: set[int] = set()
    for _ in range(runs):
        cmd = [sys.executable, str(APPENDER), str(folder), str(payload_bytes)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # wait until at least one append returned
        assert first.strip().isdigit(), "appender did not start"
        acknowledged.add(int(first))
        time.sleep(rng.uniform(0.0, max_sleep_s))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        acknowledged.update(int(line) for line in rest.split())
        result = verify_ledger(folder)
        assert result.entries >= max(acknowledged) + 1
    with Ledger(folder, create=False) as ledger:
        stored = {entry["seq"] for entry in ledger.entries()}
    assert acknowledged <= stored
    assert len(acknowledged) >= runs
    interrupted_writes = list((folder / "blobs").glob(".incoming-*"))
    if payload_bytes < 1 << 20:
        assert len(acknowledged) > runs  # the kills landed mid-loop, not before the first append
    else:
        assert interrupted_writes, "no kill landed inside a blob write; the test did not test it"
