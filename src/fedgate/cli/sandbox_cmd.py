"""`fedgate sandbox check | run`: for the hospital's IT, what the sandbox holds on this host."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

sandbox_app = typer.Typer(
    help="The sandbox the research team's ClientApp runs in: check what holds on this host, or run "
    "your own command in it.",
    no_args_is_help=True,
)
console = Console()


@sandbox_app.command()
def check(
    no_landlock: Annotated[
        bool,
        typer.Option(
            "--no-landlock",
            help="Leave Landlock out, as on kernels without it (Debian 12, Ubuntu 22.04): bubblewrap and "
            "seccomp alone must still hold.",
        ),
    ] = False,
    skip_limits: Annotated[
        bool, typer.Option("--skip-limits", help="Skip the fork, disk and memory bombs (they take a few seconds).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Play every escape attempt on this host: outside the sandbox (the control, showing the
    attempt works there) and inside it (where it must fail). Exit 0 only if every attempt held
    and every isolation layer was established.

    The limits in this check are small (1 GiB memory, 64 processes, 64 MiB scratch) so the
    bombs stay harmless; a task gets the policy's [sandbox] limits, enforced the same way."""
    from fedgate.sandbox.check import run_check

    report = run_check(
        landlock=not no_landlock,
        include_limits=not skip_limits,
        progress=None if as_json else lambda text: console.print(f"[dim]{text}…[/]"),
    )
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        sys.exit(0 if report.all_held else 1)
    layers = Table(title="isolation layers (checked from outside the sandbox where the kernel shows them)")
    for column in ("layer", "established", "detail"):
        layers.add_column(column, overflow="fold")
    for layer in report.isolation.layers if report.isolation else ():
        ok = bool(layer["established"])
        layers.add_row(str(layer["layer"]), "[green]yes[/]" if ok else "[bold red]NO[/]", str(layer["detail"]))
    console.print(layers)
    attempts = Table(title="escape attempts")
    for column in ("group", "attempt", "outside the sandbox", "inside", "why"):
        attempts.add_column(column, overflow="fold")
    for row in report.rows:
        inside = "[green]held[/]" if row.held else f"[bold red]{row.inside}[/]"
        outside = {"worked": "[yellow]worked[/]", "failed": "failed"}.get(row.outside, "[dim]not tried[/]")
        attempts.add_row(row.group, f"{row.name}\n[dim]{row.about}[/]", outside, inside, row.detail)
    console.print(attempts)
    held = sum(row.held for row in report.rows)
    landlock = "without Landlock" if no_landlock else "with Landlock where the kernel has it"
    if report.all_held:
        console.print(f"[bold green]every attempt held[/] ({held}/{len(report.rows)}, {landlock})")
        return
    console.print(f"[bold red]NOT EVERY ATTEMPT HELD[/] ({held}/{len(report.rows)} held, {landlock})")
    sys.exit(1)


@sandbox_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(help="A data folder to bind read-only, as a task sees it.")] = None,
    policy: Annotated[Path | None, typer.Option(help="Take the [sandbox] limits from this policy.")] = None,
    no_landlock: Annotated[bool, typer.Option("--no-landlock", help="Leave Landlock out.")] = False,
) -> None:
    """Run any command in exactly the sandbox a task gets (same bubblewrap line, seccomp filter,
    limits and Landlock), with its output on this terminal. Try your own escapes:

        fedgate sandbox run --data /srv/imaging -- python -c "import socket; socket.socket()"
    """
    from fedgate.executor.hospital import sandbox_spec
    from fedgate.policy import load_policy
    from fedgate.sandbox.runner import run_command

    command = list(ctx.args)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise typer.BadParameter("give the command after --, e.g. fedgate sandbox run -- python -c 'print(1)'")
    spec = sandbox_spec(load_policy(policy), data_dir=data, landlock=not no_landlock)
    sys.exit(run_command(spec, command))
