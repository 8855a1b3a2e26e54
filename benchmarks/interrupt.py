"""How fast Ctrl-C stops a run, at several moments of it (issue: within 10 s, no process left,
every ledger verifies). Timings live here, not in the tests, because they depend on the load.

    python benchmarks/interrupt.py [--moments 5] [--seed 0] [--deploy]

For each moment m (seconds after start, drawn with the seed over the run's first minute) it
starts `fedgate run --hospitals 2 --rounds 3 -c subset=200` (or `fedgate demo --deploy
--hospitals 2 --rounds 2`), sends SIGINT at m, and prints how long the command took to exit,
whether any process it started is left and whether every ledger verifies."""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedgate.ledger.verify import verify_ledger
from fedgate.sandbox import procs


def once(workdir: Path, moment: float, deploy: bool) -> tuple[float, int, int, bool]:
    out = workdir / f"run-{moment:.1f}"
    if deploy:
        args = ["demo", "--deploy", "--hospitals", "2", "--rounds", "2"]
    else:
        args = ["run", "--hospitals", "2", "--rounds", "3", "-c", "subset=200"]
    proc = subprocess.Popen([sys.executable, "-m", "fedgate.cli.main", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(moment)
    family = [proc.pid, *procs.descendants(proc.pid)]
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait()
    took = time.monotonic() - sent
    time.sleep(1)
    left = [p for p in family if procs.alive(p)]
    verified = True
    for ledger in out.glob("hospital-*/ledger"):
        try:
            verify_ledger(ledger)
        except Exception:
            verified = False
    return took, proc.returncode, len(left), verified


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moments", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deploy", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    moments = sorted(round(rng.uniform(2, 60), 1) for _ in range(args.moments))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for moment in moments:
            took, code, left, verified = once(Path(tmp), moment, args.deploy)
            worst = max(worst, took)
            print(f"SIGINT at {moment:5.1f} s: stopped in {took:5.2f} s, exit {code}, processes left {left}, "
                  f"ledgers {'verify' if verified else 'DO NOT VERIFY'}", flush=True)  # fmt: skip
    print(f"slowest stop: {worst:.2f} s (target <= 10 s)")


if __name__ == "__main__":
    main()
