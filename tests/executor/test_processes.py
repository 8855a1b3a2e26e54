"""Ctrl-C and SIGTERM in the commands that start processes: a KeyboardInterrupt, but never in
the middle of an import (raised there it can leave an import lock held and hang the threads
that import next)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# A module whose import takes a while and is interrupted half-way: with the deferral the import
# completes (its last line runs) and the KeyboardInterrupt comes right after it; raised inside
# the import, the module would be left half-run.
SLOW_MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
deadline = time.monotonic() + 0.3
while time.monotonic() < deadline:
    pass
FINISHED = True
"""

RUNNER = """
import sys, threading, time
from fedgate.executor.processes import signals_interrupt
sys.path.insert(0, sys.argv[1])
with signals_interrupt():
    try:
        import slow_module
        print("imported", slow_module.FINISHED, flush=True)
        time.sleep(30)
        print("no interrupt", flush=True)
    except KeyboardInterrupt:
        print("interrupted after the import:", "slow_module" in sys.modules, flush=True)
"""


def test_an_interrupt_during_an_import_comes_after_it(tmp_path: Path) -> None:
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUNNER), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines() == ["imported True", "interrupted after the import: True"], result.stderr


def test_an_interrupt_outside_an_import_is_immediate() -> None:
    code = (
        "import os, signal, time\n"
        "from fedgate.executor.processes import signals_interrupt\n"
        "with signals_interrupt():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "    except KeyboardInterrupt:\n"
        "        print('interrupted')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "interrupted", result.stderr
