"""Per-hospital bound and epsilon with SecAgg + distributed noise, beside the gated (local-noise)
mode, at the same accuracy of the aggregate: one table for the README.

    python benchmarks/secagg_tradeoff.py [--hospitals 5] [--rounds 12] [--coordinates 63042] [--delta 1e-5]

Same accuracy means the same noise in the model the server computes: the mean of the n
hospitals' updates carries noise of standard deviation sigma_h / sqrt(n) in both modes, where
sigma_h is what each hospital adds. So each hospital adds the same sigma_h = z·C in both rows;
what differs is what the server sees:
  gated        every reply on its own: z per reply, bound 1/(2 z^2 ln 2) bits per round
  secagg, t    only the sum; if at least t of the summed replies carry honest noise (t is at most
               the reconstruction threshold, which Flower keeps below the number of shares), the sum
               holds noise sigma_h·sqrt(t): z·sqrt(t) for each hospital, t times fewer bits
               (the `update.noise_multiplier` to write in the policy is then z·sqrt(t), with
               `noise_mode = "distributed"` and `secagg.assumed_honest = t`)
Bits are the gate's bound (`fedgate.secagg.accounting.sum_bound`, the effective norm included);
epsilon is what the gate records (`gate.accounting`: z from those bits), hospital-level
(with-or-without the hospital's update, sensitivity C), PLD at delta, over all rounds
(`fedgate.privacy.hospital_level`). The last column says what each figure rests on."""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SMALL_CNN = 63042  # float coordinates of the reference app's SmallCNN at 64x64 (benchmarks/gate_cost.py)


def rows(hospitals: int, rounds: int, coordinates: int, delta: float, multipliers: list[float]) -> list[list[str]]:
    from fedgate.privacy import UpdateNoiseEvent, hospital_level
    from fedgate.secagg.accounting import sum_bound

    table: list[list[str]] = []
    # t can be at most the reconstruction threshold, and Flower's threshold is below the shares (n)
    honest = sorted({hospitals // 2 + 1, hospitals - 1})
    for z in multipliers:
        modes = [("gated (local noise)", 1, "every reply seen alone")]
        for t in honest:
            modes.append(
                (
                    f"SecAgg+, t = {t}",
                    t,
                    f">= {t} honest replies in every sum (threshold {t}); server follows the protocol",
                )
            )
        for name, t, assumption in modes:
            bound = sum_bound(1.0, z, coordinates, t, t)
            # the z the gate accounts with (`gate.accounting`): from the bound, grid rounding included
            z_sum = 1.0 / math.sqrt(2.0 * bound.sum_bits * math.log(2.0))
            epsilon = hospital_level([UpdateNoiseEvent(z_sum, rounds)], delta).epsilon
            table.append(
                [
                    name,
                    f"{z:g}",
                    f"{z / math.sqrt(hospitals):.3g}",
                    f"{bound.sum_bits:,.3g}",
                    f"{bound.sum_bits * rounds:,.4g}",
                    f"{epsilon:,.3g}",
                    assumption,
                ]
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--coordinates", type=int, default=SMALL_CNN)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--multipliers", default="0.5,1,2", help="z = sigma_h / C each hospital adds")
    args = parser.parse_args()
    multipliers = [float(z) for z in args.multipliers.split(",")]
    header = ["mode", "noise per hospital (z = σ_h/C)", "noise in the mean (/C)", "bits per round",
              f"bits in {args.rounds} rounds", f"ε ({args.rounds} rounds, δ = {args.delta:g})", "rests on"]  # fmt: skip
    print(f"{args.hospitals} hospitals, C = 1, {args.coordinates:,} coordinates; the same noise in the aggregate "
          f"in every row of a block\n")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows(args.hospitals, args.rounds, args.coordinates, args.delta, multipliers):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
