"""`fedgate policy init | check`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedgate.errors import PolicyError
from fedgate.gate.rules import canonical_metrics
from fedgate.gate.update import capacity_bits
from fedgate.policy import default_policy_text, load_policy

policy_app = typer.Typer(help="Write and check the hospital's policy file.", no_args_is_help=True)
console = Console()


@policy_app.command("init")
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the commented default policy.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write the default policy, with a comment on every setting."""
    if path.exists() and not force:
        raise PolicyError(f"{path} exists; pass --force to overwrite it")
    path.write_text(default_policy_text())
    console.print(f"wrote {path}; edit it, then run `fedgate policy check {path}`")


@policy_app.command("check")
def check(
    path: Annotated[Path, typer.Argument(help="The policy file to validate.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the effective policy as JSON only.")] = False,
) -> None:
    """Validate a policy; print the effective policy, its hash and the bound it implies."""
    policy = load_policy(path)
    if as_json:
        print(json.dumps({"hash": policy.hash, "policy": policy.to_json()}, indent=2))
        return
    console.print_json(json.dumps(policy.to_json()))
    console.print(f"policy hash [bold]{policy.hash}[/]")
    update = capacity_bits(policy.clip_norm, policy.sigma)
    metrics = {c: canonical_metrics(None, c, policy).bits for c in ("train", "evaluate")}
    fixed = 1 + policy.release.bits
    if math.isinf(update):
        console.print("[bold red]each train reply: UNBOUNDED — noise_multiplier 0: the update can carry anything[/]")
    else:
        total = update + metrics["train"] + fixed
        console.print(
            f"each train reply: update clipped to L2 <= {policy.clip_norm:g}, noise sigma {policy.sigma:.6g}: at most "
            f"[bold]{total:,.0f} bits[/] (~{total / 8:,.0f} bytes) of any content: {update:,.0f} from the update "
            f"(a little more for large models: the grid adds < 1 %), {metrics['train']:,.0f} from the metrics, "
            f"{fixed:,.0f} from whether and when it is sent"
        )
    console.print(f"each evaluate reply: at most {metrics['evaluate'] + fixed:,.0f} bits (metrics, whether and when)")
