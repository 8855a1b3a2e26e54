"""SIGKILL at each named point of an append: the ledger verifies, holds the entry whole or not
at all, and the next append works. Kill points are chosen, not hoped for: the appender kills
itself when `append` reaches the point (tests/ledger/crash_appender.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedgate.ledger import crashpoints
from fedgate.ledger.blobs import CHUNK, INCOMING_PREFIX, PARALLEL_HASH_BYTES
from fedgate.ledger.store import Ledger
from fedgate.ledger.verify import verify_ledger

APPENDER = Path(__file__).with_name("crash_appender.py")
SMALL = 3 * CHUNK // 2  # two chunks: "in-blob-write" lands between them
LARGE = PARALLEL_HASH_BYTES + CHUNK  # the hash-while-writing thread is running when it dies

CASES = [(point, SMALL) for point in crashpoints.POINTS] + [
    ("in-blob-write", LARGE),
    ("after-blob-fsync", LARGE),
]


def crash(folder: Path, point: str, size: int) -> str:
    """Run the appender until it kills itself at `point`; return the payload's digest."""
    env = {**os.environ, "FEDGATE_LEDGER_CRASH_AT": point}
    proc = subprocess.run(
        [sys.executable, str(APPENDER), str(folder), str(size)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[1] == f"killed at {point}"
    return lines[0].removeprefix("payload ")


def incoming(folder: Path) -> list[Path]:
    return list((folder / "blobs").glob(INCOMING_PREFIX + "*"))


@pytest.mark.parametrize(("point", "size"), CASES, ids=[f"{p}-{s >> 20}MiB" for p, s in CASES])
def test_a_kill_at_each_point_leaves_the_entry_whole_or_absent(tmp_path: Path, point: str, size: int) -> None:
    folder = tmp_path / "ledger"
    with Ledger(folder) as ledger:
        for i in range(2):
            ledger.append({"kind": "before", "i": i}, {"sent": bytes([i]) * 100})
    digest = crash(folder, point, size)

    committed = point == "after-commit"
    result = verify_ledger(folder)
    assert result.entries == (3 if committed else 2)
    with Ledger(folder, create=False) as ledger:
        assert ledger.state() == ({"last": point} if committed else {})
        if committed:
            assert ledger.entries()[2]["payloads"]["sent"] == {"sha256": digest, "size": size}
    blob = folder / "blobs" / digest[:2] / digest
    partial = incoming(folder)
    if point == "before-blob-write":
        assert not partial and not blob.exists()
    elif point == "in-blob-write":
        assert [p.stat().st_size for p in partial] == [CHUNK] and size > CHUNK  # died inside the write
    elif point == "after-blob-fsync":
        assert [p.stat().st_size for p in partial] == [size] and not blob.exists()
    else:
        assert not partial and blob.stat().st_size == size  # in place; referenced only once committed

    with Ledger(folder, create=False) as ledger:
        receipt = ledger.append({"kind": "after the crash"}, {"sent": b"next"}, state={"recovered": True})
        assert receipt.seq == result.entries
        assert ledger.state() == {"recovered": True}
    assert verify_ledger(folder).entries == result.entries + 1


def test_the_hook_is_test_only(tmp_path: Path) -> None:
    """Production never reads the variable: an ordinary append with it set is not killed."""
    assert crashpoints.hook is None
    code = (
        "import sys; from pathlib import Path; from fedgate.ledger.store import Ledger\n"
        "with Ledger(Path(sys.argv[1])) as l: print(l.append({'kind': 'x'}, {'sent': b'y' * 3000000}).seq)"
    )
    env = {**os.environ, "FEDGATE_LEDGER_CRASH_AT": "in-blob-write"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "l")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr
