"""`fedgate audit`: before joining a federation, see what an attacker could rebuild of one of
the hospital's own patients from one update, under the hospital's policy."""

from __future__ import annotations

import json
import math
import secrets
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedgate.audit.defaults import DEFAULT_BUDGET_S, DEFAULT_STEPS
from fedgate.errors import FedgateError

if TYPE_CHECKING:
    from fedgate.audit.protection import Protection

# The trusted trainer's defaults when the policy has no [training] table (fedgate.training.policy).
TRUSTED_DEFAULT_Z = 0.5
TRUSTED_DEFAULT_C = 10.0
console = Console()
err_console = Console(stderr=True)

HELP = """Calibrate before joining a federation: attack one update of one of your own images.

The audit plays the worst case: one image, one training step, weights chosen by the server
(an untrained zoo model), the update protected exactly as your policy's \\[update] table says
(clip, noise, distributed share). It runs an Inverting-Gradients attack on that update and,
for comparison, the same attack on updates that carry no information about the image (the
null runs). Everything runs on this machine; nothing of the audit is sent anywhere.

How to read the numbers:

- rank: where the true image lands when all your images are sorted by how well they match
  the reconstruction (1 = the attacker picks out this patient). null rank: the best rank the
  no-information runs reached - what a blind guess achieves for this image.

- verdict: "re-identifiable" when the rank is in the top 1 % of your images and better than
  every null run; otherwise "not-distinguishable" (from a blind guess).

- PSNR (dB) and SSIM (-1..1, 1 = identical) of the best reconstruction: for scale only. A
  recognisable reconstruction can score under 18 dB, the dataset's mean image about 12.7 dB,
  so do not read safety off PSNR.

--unprotected attacks the raw update: the control that shows the attack works on your data.
--trusted audits fedgate's own DP-SGD trainer instead, at the weakest recipe the policy's
\\[training] table allows (min_noise_multiplier)."""


def _trusted_protection(policy: Path | None) -> Protection:
    """DP-SGD at the policy's floor. Only the noise multiplier matters to the worst-case
    attack (the per-sample gradient fills the clip norm C and the noise is z * C)."""
    from fedgate.audit.protection import Protection

    table: dict[str, object] = {}
    if policy is not None:
        with policy.open("rb") as handle:
            raw = tomllib.load(handle).get("training", {})
        table = raw if isinstance(raw, dict) else {}
    z = table.get("min_noise_multiplier", TRUSTED_DEFAULT_Z)
    clip = table.get("max_grad_norm_ceiling", TRUSTED_DEFAULT_C)
    if not isinstance(z, (int, float)) or not isinstance(clip, (int, float)):
        raise FedgateError("training.min_noise_multiplier and training.max_grad_norm_ceiling must be numbers")
    return Protection.dp_sgd(float(clip), float(z))


def _write_images(folder: Path, true: np.ndarray, reconstruction: np.ndarray, null: np.ndarray) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    side = np.full((true.shape[0], 2), 255, dtype=np.uint8)
    named = {
        "true.png": true,
        "reconstruction.png": reconstruction,
        "null.png": null,
        "true-reconstruction-null.png": np.concatenate([true, side, reconstruction, side, null], axis=1),
    }
    for name, pixels in named.items():
        path = folder / name
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def audit(
    policy: Annotated[
        Path | None, typer.Option(help="The hospital's policy (TOML); its \\[update] table sets the protection.")
    ] = None,
    data: Annotated[
        str, typer.Option(help="The hospital's images: br35h (the reference), npz:PATH, dicom:DIR or folder:DIR.")
    ] = "br35h",
    model: Annotated[str, typer.Option(help="Zoo model the federation trains: cnn (SmallCNN) or resnet18.")] = "cnn",
    unprotected: Annotated[
        bool, typer.Option("--unprotected", help="Attack the raw update (the control that the attack works).")
    ] = False,
    trusted: Annotated[
        bool,
        typer.Option("--trusted", help="Audit the trusted DP-SGD trainer at the policy's noise floor instead."),
    ] = False,
    with_images: Annotated[
        Path | None,
        typer.Option(
            "--with-images",
            help="Write the pictures (true | reconstruction | null) as PNG here. They are patient images: "
            "keep them at the hospital.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object: verdict, psnr, ssim, rank, null_rank, candidates, seconds."
        ),
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for the simulation (default: OS entropy).")] = None,
    image_index: Annotated[
        int | None, typer.Option(help="Which image to audit (default: one at random from the seed).")
    ] = None,
    image_size: Annotated[int, typer.Option(help="Side of the square grayscale images the model takes.")] = 64,
    steps: Annotated[
        int | None, typer.Option(help="Attack steps (default: chosen to fit about 60 s on two cores).")
    ] = None,
    budget_s: Annotated[
        float, typer.Option(help="Stop the attack after this many seconds (0: no limit, the full attack).")
    ] = DEFAULT_BUDGET_S,
) -> None:
    from fedgate.audit import Protection, audit_update
    from fedgate.audit.sources import load_images
    from fedgate.policy import load_policy

    if unprotected and trusted:
        raise FedgateError("--unprotected and --trusted exclude each other")
    if unprotected:
        protection = Protection.none()
    elif trusted:
        protection = _trusted_protection(policy)
    else:
        protection = Protection.from_policy(load_policy(policy))
    images, labels = load_images(data, image_size)
    if len(images) < 2:
        raise FedgateError(f"{data} holds {len(images)} image(s); the audit ranks against the hospital's images")
    seed = secrets.randbits(63) if seed is None else seed
    index = int(np.random.default_rng(seed).integers(len(images))) if image_index is None else image_index
    if not 0 <= index < len(images):
        raise FedgateError(f"--image-index {index} is outside 0..{len(images) - 1}")
    n_classes = max(2, int(labels.max()) + 1)

    with Progress(
        TextColumn("[bold]attacking[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=as_json,
    ) as bar:
        task = bar.add_task(protection.label(), total=steps or DEFAULT_STEPS)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = audit_update(
            model,
            None,
            images[index],
            int(labels[index]),
            images,
            protection,
            n_classes=n_classes,
            steps=steps or DEFAULT_STEPS,
            budget_s=budget_s or None,
            seed=seed,
            progress=progress,
        )

    written = (
        []
        if with_images is None
        else _write_images(with_images, result.images.true, result.images.reconstruction, result.images.null)
    )
    if as_json:
        print(json.dumps(result.summary()))
        return
    identified = result.verdict == "re-identifiable"
    console.print(
        f"[bold {'red' if identified else 'green'}]{result.verdict}[/]: image {index} of {data} "
        f"ranks {result.rank} of {result.candidates} against the attacker's reconstruction; "
        f"the no-information runs reach {result.null_rank} at best."
    )
    table = Table(show_header=False)
    table.add_row("protection", protection.label())
    table.add_row("rank (1 = picked out)", f"{result.rank} of {result.candidates} (threshold {result.rank_threshold})")
    table.add_row("null ranks (no information)", ", ".join(str(r) for r in result.null_ranks))
    table.add_row("PSNR / SSIM", f"{result.psnr:.1f} dB / {result.ssim:.2f}" if math.isfinite(result.psnr) else "inf")
    table.add_row("null PSNR / SSIM", f"{result.null_psnr:.1f} dB / {result.null_ssim:.2f}")
    table.add_row("label from the update", "right" if result.inferred_label == result.label else "wrong")
    table.add_row("attack", f"{result.steps} steps, {result.restarts} restart(s), {result.seconds:.0f} s, seed {seed}")
    console.print(table)
    if not result.complete:
        console.print(
            f"[yellow]the time budget cut the attack to {result.steps} of {result.planned_steps} steps: a weaker "
            "attack than planned, so a 'not-distinguishable' verdict is weaker evidence; rerun on an idle machine "
            "or with --budget-s 0[/]"
        )
    for path in written:
        console.print(f"wrote {path} [yellow](patient image: keep it at the hospital)[/]")


audit.__doc__ = HELP
