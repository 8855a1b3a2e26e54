"""The sandbox's cost in simulation: the demo with every hospital's ClientApp sandboxed (the
default) against the same demo with `--no-isolation` (the ClientApp in Flower's own actor
processes, nothing enforced), run one after the other in this process, alternating.

    python benchmarks/sandbox_overhead.py [--hospitals 5] [--rounds 12] [--repeats 1] [-c KEY=VALUE ...]

Prints each run's wall time and the ratio sandboxed / no-isolation (target <= 1.25x) for the
whole command and per round (median gap between the ServerApp's centralised evaluations after
round 1, so start-up is excluded from the second figure)."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(workdir: Path, name: str, args: argparse.Namespace, isolated: bool) -> tuple[float, list[float]]:
    out = workdir / name
    cmd = [sys.executable, "-m", "fedgate.cli.main", "demo", "--hospitals", str(args.hospitals),
           "--rounds", str(args.rounds), "--out", str(out)]  # fmt: skip
    if not isolated:
        cmd.append("--no-isolation")
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = out / "runs" / str(summary["run_id"]) / "rounds.jsonl"
    times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if line.strip()]
    per_round = [b - a for a, b in itertools.pairwise(times[1:])]
    print(f"{name:24s} {seconds:6.1f} s  accuracy {summary['final_accuracy']:.3f}  "
          f"per round {statistics.median(per_round) if per_round else float('nan'):.2f} s", flush=True)  # fmt: skip
    return seconds, per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    total: dict[bool, list[float]] = {True: [], False: []}
    rounds: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for isolated in (False, True, False):  # the baseline before and after
                name = f"{'sandboxed' if isolated else 'no-isolation'}-{repeat}-{len(total[isolated])}"
                seconds, per_round = run(Path(tmp), name, args, isolated)
                total[isolated].append(seconds)
                rounds[isolated] += per_round
    whole = statistics.median(total[True]) / statistics.median(total[False])
    per = statistics.median(rounds[True]) / statistics.median(rounds[False])
    print(f"ratio sandboxed / no-isolation: whole command {whole:.2f}x, per round {per:.2f}x   (target <= 1.25x)")


if __name__ == "__main__":
    main()
