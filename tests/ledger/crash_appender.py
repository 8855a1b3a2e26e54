"""Appends once to a ledger and is killed (SIGKILL, by itself) at a named point of that append.

    FEDGATE_LEDGER_CRASH_AT=<point> python crash_appender.py FOLDER PAYLOAD_BYTES

Run by test_crash.py. The environment is read once, here: the ledger itself never reads it."""

import hashlib
import os
import signal
import sys
from pathlib import Path

from fedgate.ledger import crashpoints
from fedgate.ledger.store import Ledger

point = os.environ["FEDGATE_LEDGER_CRASH_AT"]
if point not in crashpoints.POINTS:
    sys.exit(f"unknown crash point {point!r}; one of {crashpoints.POINTS}")


def kill_at(reached: str) -> None:
    if reached == point:
        sys.stdout.write(f"killed at {point}\n")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


folder, size = Path(sys.argv[1]), int(sys.argv[2])
payload = os.urandom(size)
sys.stdout.write(f"payload {hashlib.sha256(payload).hexdigest()}\n")
sys.stdout.flush()
crashpoints.hook = kill_at
with Ledger(folder, create=False) as ledger:
    ledger.append({"kind": "crash-test", "point": point}, {"sent": payload}, state={"last": point})
sys.stdout.write("not killed\n")
