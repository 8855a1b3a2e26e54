"""Appends to a ledger in a loop, printing each sequence number once append() returned.
Run by test_crash.py, which kills it with SIGKILL at random moments."""

import os
import sys
from pathlib import Path

from fedgate.ledger.store import Ledger

folder = Path(sys.argv[1])
size = int(sys.argv[2])
with Ledger(folder) as ledger:
    while True:
        receipt = ledger.append({"kind": "crash-test", "pid": os.getpid()}, {"sent": os.urandom(size)})
        sys.stdout.write(f"{receipt.seq}\n")
        sys.stdout.flush()
