"""Per-round time of the deployment with fedgate against the same deployment with Flower's
own executor (flower-superexec + flwr-clientapp), measured in one process, one after the other.

    python benchmarks/deployment_overhead.py [--hospitals 3] [--rounds 4] [--repeats 1]

Both runs: flower-superlink with TLS and SuperNode authentication, one flower-supernode
--isolation process per hospital, the reference app (small CNN, Br35H, 2 local epochs).
"fedgate" runs each ClientApp in the sandbox and gates, clips, noises and records every reply;
"flower" runs it with flwr-clientapp. Per-round time is the median gap between the ServerApp's
consecutive centralised evaluations (round 1 is excluded: it includes app installation)."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console

from fedgate.executor.local_federation import run_local_deployment
from fedgate.executor.progress import METRICS_FILE

CONFIG = {"partition": "dirichlet", "alpha": 0.5, "local-epochs": 2, "lr": 0.001}


def per_round_seconds(out: Path) -> list[float]:
    metrics = next((out / "runs").glob(f"*/{METRICS_FILE}"))
    times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if line.strip()]
    return [b - a for a, b in itertools.pairwise(times[1:])]  # skip round 0 -> 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    console = Console(quiet=True)
    samples: dict[str, list[float]] = {"flower": [], "fedgate": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in ("flower", "fedgate", "flower"):  # the baseline before and after
                out = Path(tmp) / f"{name}-{repeat}-{len(samples[name])}"
                run_local_deployment(out, args.hospitals, args.rounds, None, CONFIG, console, gated=name == "fedgate")
                samples[name] += per_round_seconds(out)
                print(f"{name:8s} rounds {[f'{s:.1f}' for s in per_round_seconds(out)]}", flush=True)
    flower, fedgate = statistics.median(samples["flower"]), statistics.median(samples["fedgate"])
    print(f"median per-round time: flower {flower:.2f} s, fedgate {fedgate:.2f} s")
    print(f"ratio fedgate / flower: {fedgate / flower:.2f}x   (target <= 1.10x)")


if __name__ == "__main__":
    main()
