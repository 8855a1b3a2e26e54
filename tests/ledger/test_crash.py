"""SIGKILL at random moments loses no returned append and leaves a ledger that verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger

APPENDER = Path(__file__).with_name("crash_appender.py")
RUNS = 50


def test_sigkill_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    folder = tmp_path / "ledger"
    rng = random.Random(20261127)
    acknowledged: set[int] = set()
    for _ in range(RUNS):
        proc = subprocess.Popen([sys.executable, str(APPENDER), str(folder)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # wait until at least one append returned
        assert first.strip().isdigit(), "appender did not start"
        acknowledged.add(int(first))
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        acknowledged.update(int(line) for line in rest.split())
        result = verify_ledger(folder)
        assert result.entries >= max(acknowledged) + 1
    with Ledger(folder, create=False) as ledger:
        stored = {entry["seq"] for entry in ledger.entries()}
    assert acknowledged <= stored
    assert len(acknowledged) > RUNS  # the kills landed mid-loop, not before the first append
