"""Accuracy against the egress bound: the demo run once per noise multiplier z.

    python benchmarks/noise_tradeoff.py [--z 0 0.003 0.01 0.03 0.1] [--rounds 12]

Prints a Markdown table (z, sigma, bits per train reply, final accuracy, AUC, seconds).
Each row is a full `fedgate demo` (about a minute on two cores)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedgate.policy import default_policy_text


def run(z: float, rounds: int, workdir: Path) -> dict[str, object]:
    policy = workdir / f"policy-z{z}.toml"
    policy.write_text(default_policy_text().replace("noise_multiplier = 0.01", f"noise_multiplier = {z}"))
    out = workdir / f"run-z{z}"
    cmd = [
        sys.executable,
        "-m",
        "fedgate.cli.main",
        "demo",
        "--rounds",
        str(rounds),
        "--policy",
        str(policy),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--z", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    print("| z | sigma (C = 1) | bits per train reply | final accuracy | final AUC | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for z in args.z:
            summary = run(z, args.rounds, Path(tmp))
            bits = summary["bits_per_reply"]["hospital-0"]  # type: ignore[index]
            shown = "unbounded" if bits is None else f"{bits:,.0f}"
            accuracy, auc, seconds = summary["final_accuracy"], summary["final_auc"], summary["seconds"]
            print(f"| {z} | {z:g} | {shown} | {accuracy:.3f} | {auc:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
