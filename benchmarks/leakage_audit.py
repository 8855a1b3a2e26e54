"""The leakage audit on Br35H: what an attacker rebuilds of one patient from one update,
under each protection fedgate offers, each beside its null run.

    nice -n 10 python benchmarks/leakage_audit.py [--images 1500 ...] [--gated-z 0.01 0.1]
        [--dp-z 1] [--secagg-z 0.05] [--steps N] [--restarts N] [--null-runs N] [--budget-s 60]
        [--seed 0] [--only ROW ...] [--membership EPOCHS ...]

Worst case throughout: one image, one step, the untrained SmallCNN a malicious server may
send, all 3,000 Br35H images as the hospital's candidates. Prints a Markdown table: PSNR and
SSIM of the best reconstruction, the true image's rank (1 = identified), the best rank of
the null runs (the same attack on an update with no information about the image), the
verdict, the seconds. Also a blind guess for scale (the dataset-mean image, no attack).
The accuracy each setting gives comes from the noise / privacy benchmarks.

`--membership` adds membership inference on a trained SmallCNN: a hospital-sized set of 480
Br35H images trained centrally without DP (Adam 1e-3, batch 32, flips) for E epochs, its
480 members against 480 images it never saw; loss-threshold and difficulty-calibrated AUC
(reference model: another 480 images) with 95 % bootstrap intervals."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from torch import nn

from fedgate.audit import Protection, audit_update, membership_audit
from fedgate.audit.defaults import DEFAULT_BUDGET_S, DEFAULT_NULL_RUNS, DEFAULT_RESTARTS, DEFAULT_STEPS
from fedgate.audit.scoring import psnr, reidentification_rank, ssim
from fedgate.audit.sources import build_model, load_images, to_model_space


def settings(gated_z: list[float], dp_z: float, secagg_z: float) -> list[tuple[str, Protection]]:
    rows = [("raw single-image update", Protection.none())]
    for z in gated_z:
        shipped = ", shipped policy" if z == 0.01 else ""
        rows.append((f"gated{shipped}: C = 1, z = {z:g}", Protection.gate(1.0, z)))
    rows.append((f"trusted DP-SGD: C = 1, z = {dp_z:g} (eps ~ 8 / patient at z = 1)", Protection.dp_sgd(1.0, dp_z)))
    for seen, what in (("reply", "one reply (SecAgg bypassed)"), ("sum", "the sum (honest SecAgg)")):
        name = f"SecAgg + distributed noise, 5 hospitals, z = {secagg_z:g}: {what}"
        rows.append((name, Protection.gate(1.0, secagg_z, "distributed", 5, seen)))
    return rows


def train(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("cnn", 2, images.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = to_model_space(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            inputs = x[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            inputs[flip] = inputs[flip].flip(-1)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), y[batch]).backward()
            optimizer.step()
    return model


def membership(images: np.ndarray, labels: np.ndarray, epochs: list[int], seed: int, n: int = 480) -> None:
    order = np.random.default_rng([seed, 14]).permutation(len(images))
    members, nonmembers, others = order[:n], order[n : 2 * n], order[2 * n : 3 * n]
    print("\n| epochs | accuracy on non-members | attack | AUC | 95 % CI |")
    print("|---|---|---|---|---|")
    for count in epochs:
        model = train(images[members], labels[members], count, seed)
        reference = train(images[others], labels[others], count, seed + 1)
        with torch.no_grad():
            model.eval()
            predicted = model(to_model_space(images[nonmembers])).argmax(1).numpy()
        accuracy = float((predicted == labels[nonmembers]).mean())
        results = membership_audit(
            model,
            (images[members], labels[members]),
            (images[nonmembers], labels[nonmembers]),
            np.random.default_rng(seed),
            reference,
        )
        for result in results:
            print(
                f"| {count} | {accuracy:.3f} | {result.method} | {result.auc:.3f} | "
                f"{result.ci_low:.3f}-{result.ci_high:.3f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1500])
    parser.add_argument("--gated-z", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--dp-z", type=float, default=1.0)
    parser.add_argument("--secagg-z", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS)
    parser.add_argument("--null-runs", type=int, default=DEFAULT_NULL_RUNS)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="0: no limit (the full attack)")
    parser.add_argument("--tv", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, nargs="*", default=None, help="row numbers (0-based) to run")
    parser.add_argument("--membership", type=int, nargs="*", default=None, help="epochs to train, e.g. 24 100")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images, labels = load_images("br35h", 64)
    mean_image = images.mean(axis=0).round().astype(np.uint8)
    extra = {} if args.tv is None else {"tv_weight": args.tv}
    audited = [] if args.only == [] else args.images  # `--only` with no rows: membership alone
    if audited:
        print(
            f"Br35H, {len(images)} candidates, SmallCNN untrained (seed {args.seed}), {args.steps} steps, "
            f"{args.restarts} restart(s), {args.null_runs} null runs, budget {args.budget_s:g} s\n"
        )
        print("| image | update the attacker sees | PSNR | SSIM | rank | null rank | verdict | steps | s |")
        print("|---|---|---|---|---|---|---|---|---|")
    rows = settings(args.gated_z, args.dp_z, args.secagg_z)
    for index in audited:
        image = images[index]
        guess_rank = reidentification_rank(np.concatenate([image[None], np.delete(images, index, 0)]), 0, mean_image)
        print(
            f"| {index} | blind guess: the dataset-mean image (no attack) | {psnr(image, mean_image):.1f} | "
            f"{ssim(image, mean_image):.2f} | {guess_rank} | - | - | - | - |",
            flush=True,
        )
        for number, (name, protection) in enumerate(rows):
            if args.only is not None and number not in args.only:
                continue
            result = audit_update(
                "cnn",
                None,
                image,
                int(labels[index]),
                images,
                protection,
                budget_s=args.budget_s or None,
                steps=args.steps,
                restarts=args.restarts,
                null_runs=args.null_runs,
                seed=args.seed,
                **extra,
            )
            nulls = ", ".join(str(r) for r in result.null_ranks)
            print(
                f"| {index} | {name} | {result.psnr:.1f} | {result.ssim:.2f} | **{result.rank}** | "
                f"{result.null_rank} ({nulls}) | {result.verdict} | {result.steps} | {result.seconds:.0f} |",
                flush=True,
            )

    if args.membership:
        membership(images, labels, args.membership, args.seed)


if __name__ == "__main__":
    main()
