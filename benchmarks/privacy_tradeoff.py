"""Accuracy against per-patient ε: fedgate's own DP-SGD trainer (trusted mode) in a federation.

    python benchmarks/privacy_tradeoff.py [--quick] [--targets 1 3 8] [--rounds 12] [--hospitals 5]
        [--model small-cnn|scatternet-linear|...] [--batch 32] [--epochs 2] [--optimizer adam]
        [--lr 0.001] [--clip 1.0] [--augment none|hflip] [--noise shared|per-hospital]
        [--no-baseline] [--log] [--json out.json]

PLAIN FEDAVG IN ONE PROCESS: no Flower, no gate, no sandbox, no ledger. Each round every hospital
runs `fedgate.training.trainer.train_dp` (Opacus: Poisson sampling, per-sample clipping, noise)
on its own share (`fedgate.data.hospital_dataset`, the same share the gated demo trains on),
and the server averages the replies weighted by image count. What it measures is the model
that DP-SGD at a given ε gives, not the system's speed.

For each target ε the noise multiplier z is calibrated so that the *largest* per-hospital ε
(record level, dp-accounting PLD, δ = 1e-5, all rounds composed) meets it. `--noise shared`:
one recipe for all hospitals, so the hospital that needs most noise (usually the smallest)
sets z for everyone; `--noise
per-hospital`: each hospital raises z to what its own size needs for the target (a hospital-side
choice a recipe cannot express today). The "no DP" row is non-private FedAvg with the
reference app's training loop (Adam 1e-3, batch 32, 2 local epochs, flips), as in the demo.
The last line gives, for comparison, the gated mode's hospital-level ε at the shipped z = 0.01.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedgate.data import ImageSet, ShareSpec, global_test_dataset, hospital_dataset
from fedgate.privacy import UpdateNoiseEvent, calibrate_noise_multiplier, hospital_level, record_level
from fedgate.training import Recipe, build_model
from fedgate.training.networks import FixedFeatureNetwork
from fedgate.training.plan import planned_event
from fedgate.training.trainer import fixed_features, model_input, train_dp

DELTA = 1e-5
Arrays = dict[str, np.ndarray]


def initial_arrays(recipe: Recipe, seed: int) -> Arrays:
    torch.manual_seed(seed)  # as the reference app's new_model: the same start for every row
    model = build_model(recipe.model, recipe.classes, recipe.image_size)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary ROC AUC by the rank-sum formula (ties averaged)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average the ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(recipe: Recipe, arrays: Arrays, test: ImageSet) -> tuple[float, float]:
    model = build_model(recipe.model, recipe.classes, recipe.image_size)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    model.eval()
    if isinstance(model, FixedFeatureNetwork):  # the scattering of the test set, computed once
        logits = model.head(fixed_features(model, test.images))
    else:
        images = model_input(test.images)
        logits = torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)])
    probs = torch.softmax(logits, dim=1).numpy()
    return float((probs.argmax(1) == test.labels).mean()), roc_auc(probs[:, 1], test.labels)


def fedavg(
    local: Callable[[int, int, Arrays], Arrays],
    start: Arrays,
    sizes: list[int],
    rounds: int,
    after_round: Callable[[int, Arrays], None],
) -> Arrays:
    """Plain weighted FedAvg: every hospital every round."""
    global_arrays = start
    weights = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    for rnd in range(1, rounds + 1):
        replies = [local(rnd, h, global_arrays) for h in range(len(sizes))]
        global_arrays = {
            k: sum(w * r[k].astype(np.float64) for w, r in zip(weights, replies, strict=True)).astype(v.dtype)
            for k, v in start.items()
        }
        after_round(rnd, global_arrays)
    return global_arrays


def per_hospital_epsilon(recipe: Recipe, sizes: list[int], rounds: int) -> list[float]:
    return [record_level([planned_event(recipe, n)] * rounds, DELTA).epsilon for n in sizes]


def run_dp(
    recipes: list[Recipe], trains: list[ImageSet], test: ImageSet, rounds: int, seed: int, log: bool
) -> dict[str, Any]:
    """One recipe per hospital (the same one, unless each hospital calibrates its own noise)."""
    sizes = [len(t) for t in trains]
    started = time.perf_counter()
    history: list[tuple[int, float, float]] = []

    def local(rnd: int, hospital: int, arrays: Arrays) -> Arrays:
        return train_dp(recipes[hospital], trains[hospital], arrays, seed=seed * 10_000 + rnd * 100 + hospital).arrays

    def after_round(rnd: int, arrays: Arrays) -> None:
        accuracy, auc = evaluate(recipes[0], arrays, test)
        history.append((rnd, accuracy, auc))
        if log:
            print(f"    round {rnd}: accuracy {accuracy:.3f} AUC {auc:.3f} ({time.perf_counter() - started:.0f} s)")

    fedavg(local, initial_arrays(recipes[0], seed), sizes, rounds, after_round)
    epsilons = [per_hospital_epsilon(r, [n], rounds)[0] for r, n in zip(recipes, sizes, strict=True)]
    return {
        "z": [r.noise_multiplier for r in recipes],
        "accuracy": history[-1][1],
        "auc": history[-1][2],
        "epsilon_max": max(epsilons),
        "epsilon_per_hospital": epsilons,
        "seconds": time.perf_counter() - started,
        "per_round": history,
    }


def run_baseline(
    recipe: Recipe, trains: list[ImageSet], test: ImageSet, rounds: int, seed: int, log: bool
) -> dict[str, Any]:
    from fedgate_medical.task import train  # the reference app's non-private loop (as in the demo)

    sizes = [len(t) for t in trains]
    started = time.perf_counter()
    history: list[tuple[int, float, float]] = []

    def local(rnd: int, hospital: int, arrays: Arrays) -> Arrays:
        model = build_model(recipe.model, recipe.classes, recipe.image_size)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
        train(model, trains[hospital], epochs=2, lr=0.001, batch_size=32, seed=seed * 1000 + rnd * 100 + hospital)
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    def after_round(rnd: int, arrays: Arrays) -> None:
        accuracy, auc = evaluate(recipe, arrays, test)
        history.append((rnd, accuracy, auc))
        if log:
            print(f"    round {rnd}: accuracy {accuracy:.3f} AUC {auc:.3f} ({time.perf_counter() - started:.0f} s)")

    fedavg(local, initial_arrays(recipe, seed), sizes, rounds, after_round)
    return {
        "z": None,
        "accuracy": history[-1][1],
        "auc": history[-1][2],
        "epsilon_max": math.inf,
        "epsilon_per_hospital": [math.inf] * len(sizes),
        "seconds": time.perf_counter() - started,
        "per_round": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="600 images, 2 hospitals, 2 rounds, target ε = 8")
    parser.add_argument("--subset", type=int, default=0)
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--targets", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--batch", type=int, default=32, help="expected Poisson batch")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--clip", type=float, default=1.0, help="per-sample max grad norm C")
    parser.add_argument("--augment", default="none", choices=["none", "hflip"])
    parser.add_argument(
        "--noise",
        default="shared",
        choices=["shared", "per-hospital"],
        help="shared: one z, set by the smallest hospital; per-hospital: each hospital raises z to its own target",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", action="store_true", help="one line per round")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.hospitals, args.rounds = 600, 2, 2
        args.targets = [8.0] if args.targets == [1.0, 3.0, 8.0] else args.targets
    torch.set_num_threads(1)

    share = ShareSpec("br35h", 64, args.subset, "dirichlet", 0.5, 0.2, args.seed)
    trains = [hospital_dataset("br35h", h, args.hospitals, **_share_kwargs(share))[0] for h in range(args.hospitals)]
    test = global_test_dataset(share, args.hospitals)
    sizes = [len(t) for t in trains]
    base = Recipe(args.model, 64, 2, args.optimizer, args.lr, args.epochs, args.batch, args.clip, 1.0, args.augment)
    print(
        f"PLAIN FEDAVG IN ONE PROCESS (no Flower, no gate): Br35H, {args.hospitals} hospitals (Dirichlet 0.5), "
        f"training images {sizes}, test {len(test)}, {args.rounds} rounds; DP-SGD recipe: {args.model}, "
        f"{args.optimizer} lr {args.lr}, {args.epochs} local epochs, expected batch {args.batch}, C {args.clip}, "
        f"augment {args.augment}; ε per patient = record level, PLD, δ = {DELTA}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    total = time.perf_counter()
    if not args.no_baseline:
        row = run_baseline(base, trains, test, args.rounds, args.seed, args.log)
        rows.append({"setting": "no DP (non-private FedAvg, the app's loop)", **row})
        _print(rows[-1])
    for target in args.targets:

        def noise_for(n: int, target: float = target) -> float:
            z = calibrate_noise_multiplier(
                lambda z: [planned_event(dataclasses.replace(base, noise_multiplier=z), n)] * args.rounds,
                target,
                DELTA,
                tolerance=0.005,
            )
            return round(z + 0.0005, 3)  # rounded up: never above the target

        needed = [noise_for(n) for n in sizes]
        if args.noise == "shared":  # the largest need: usually the smallest hospital, not when q caps at 1
            recipes = [dataclasses.replace(base, noise_multiplier=max(needed))] * len(sizes)
        else:
            recipes = [dataclasses.replace(base, noise_multiplier=z) for z in needed]
        row = run_dp(recipes, trains, test, args.rounds, args.seed, args.log)
        rows.append({"setting": f"DP-SGD, target ε = {target:g} ({args.noise} z)", **row})
        _print(rows[-1])
    gated = hospital_level([UpdateNoiseEvent(0.01)] * args.rounds, DELTA)
    print()
    print("| setting | noise multiplier z | accuracy | AUC | largest per-hospital ε | per-hospital ε | seconds |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        z = "-" if row["z"] is None else "/".join(sorted({f"{v:.3f}" for v in row["z"]}, key=float))
        eps = ", ".join(_eps(e) for e in row["epsilon_per_hospital"])
        print(
            f"| {row['setting']} | {z} | {row['accuracy']:.3f} | {row['auc']:.3f} | {_eps(row['epsilon_max'])} "
            f"| {eps} | {row['seconds']:.0f} |"
        )
    print(
        f"\nGated mode for comparison: the gate's update noise at z = 0.01 is worth ε = {gated.epsilon:,.0f} "
        f"per hospital ({args.rounds} replies, PLD, δ = {DELTA}, sensitivity C: the hospital's update vs none)."
    )
    print(f"total {time.perf_counter() - total:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"args": vars(args), "sizes": sizes, "rows": rows, "gated_epsilon": gated.epsilon}, handle, indent=1
            )


def _share_kwargs(share: ShareSpec) -> dict[str, Any]:
    return {
        "image_size": share.image_size,
        "subset": share.subset,
        "partition": share.partition,
        "alpha": share.alpha,
        "test_fraction": share.test_fraction,
        "seed": share.seed,
    }


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _print(row: dict[str, Any]) -> None:
    print(
        f"  {row['setting']}: accuracy {row['accuracy']:.3f}, AUC {row['auc']:.3f}, "
        f"largest ε {_eps(row['epsilon_max'])}, {row['seconds']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
