"""`fedgate sandbox run`, the command an auditor uses to try their own escapes: the same sandbox
a task gets, the command's exit status passed through, its output on the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FEDGATE = [sys.executable, "-m", "fedgate.cli.main"]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
PROBE = (
    "import os, socket, sys\n"
    "data = sys.argv[1]\n"
    "print('uid', os.getuid())\n"
    "print('data', sorted(os.listdir(data)) if os.path.isdir(data) else None)\n"
    "try:\n"
    "    socket.socket()\n"
    "    print('socket made')\n"
    "except OSError as err:\n"
    "    print('socket refused', err.errno)\n"
    "try:\n"
    "    open(os.path.join(data, 'planted'), 'w')\n"
    "    print('data written')\n"
    "except OSError:\n"
    "    print('data read-only')\n"
    "raise SystemExit(7)\n"
)


def sandbox_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDGATE, "sandbox", "run", *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_sandbox_run_gives_a_command_the_tasks_sandbox(tmp_path: Path) -> None:
    data = tmp_path / "imaging"
    data.mkdir()
    (data / "scan-1.png").write_bytes(b"x")
    for extra in ((), ("--no-landlock",)):
        done = sandbox_run("--data", str(data), *extra, "--", sys.executable, "-c", PROBE, str(data))
        assert done.returncode == 7, done.stderr  # the command's own status
        lines = done.stdout.splitlines()
        assert "uid 65534" in lines  # never the caller's uid (root here)
        assert "socket refused 1" in lines  # EPERM from the seccomp filter: no socket of any family
        assert "data ['scan-1.png']" in lines  # the data folder, bound read-only
        assert "data read-only" in lines and not (data / "planted").exists()
    outside = subprocess.run([sys.executable, "-c", PROBE, str(data)], capture_output=True, text=True, env=ENV,
                             timeout=60)  # fmt: skip
    assert "socket made" in outside.stdout and "data written" in outside.stdout  # the control, run outside


def test_sandbox_run_without_a_command_says_how() -> None:
    done = sandbox_run()
    assert done.returncode != 0 and "fedgate sandbox run --" in done.stdout + done.stderr
