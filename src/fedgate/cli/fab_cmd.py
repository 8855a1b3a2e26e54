"""`fedgate fab check`: what is in a research team's app package, and would this hospital install it.

Every string from the FAB is untrusted: it is printed through `_safe` (control and format
characters escaped, no rich markup), so a package cannot rewrite the terminal it is reviewed in."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
import unicodedata
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedgate.errors import PolicyError
from fedgate.fab import FabPolicy, FabReport, inspect_fab, parse_fab_policy

fab_app = typer.Typer(
    help="Inspect and approve the research team's Flower app package (FAB) before it runs here.\n\n"
    "A FAB is the zip `flwr build` makes from a Flower app folder (`flwr build --app APP_DIR` writes "
    "PUBLISHER.NAME.VERSION.HASH8.fab). Ask the research team for it, or build it from the source they "
    "gave you; the same source and Flower version build the same bytes, so the same hash.",
    no_args_is_help=True,
)


@fab_app.callback()
def _group() -> None:
    """Keeps `check` a named sub-command (a one-command typer app would swallow its name)."""


console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def _safe(value: object) -> Text:
    """Untrusted text as plain text: control/format characters (ESC, NUL, RTL override) escaped."""
    text = "".join(
        c if not unicodedata.category(c).startswith("C") else c.encode("unicode_escape").decode("ascii")
        for c in str(value)
    )
    return Text(text)


def _fail(message: str) -> NoReturn:
    err_console.print(Text(message, style="red"))
    raise typer.Exit(2)


def read_fab_policy(path: Path | None) -> FabPolicy:
    """The `[fab]` table of the hospital's policy file; the defaults when no file is given."""
    if path is None:
        return FabPolicy()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"cannot read policy {path}: {err}") from err
    return parse_fab_policy(data.get("fab", {}))


def _read_report(path: Path, policy: FabPolicy) -> FabReport:
    """Check the FAB at `path`; one larger than the policy allows is hashed, not read into memory."""
    size = path.stat().st_size
    if size <= policy.max_fab_bytes:
        return inspect_fab(path.read_bytes(), policy)
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return FabReport(
        sha256=digest.hexdigest(),
        fab_bytes=size,
        verdict="refused",
        rule="fab-size",
        reason=f"the FAB is larger than fab.max_fab_bytes = {policy.max_fab_bytes:,}",
        detail=(("size", size),),
        approval=policy.approval(digest.hexdigest()),
    )


def _print_report(path: Path, report: FabReport) -> None:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("FAB", _safe(path))
    facts.add_row("hash", Text(report.fab_ref, style="bold"))
    for label, value in (
        ("publisher", report.publisher),
        ("name", report.name),
        ("version", report.version),
        ("ClientApp", report.client_app),
        ("ServerApp", report.server_app),
    ):
        facts.add_row(label, _safe(value) if value is not None else Text("(not reached)", style="dim"))
    console.print(facts)
    if report.client_app:
        console.print(
            Text(
                "The ClientApp runs here, in the sandbox, on your data; the ServerApp runs at the server.", style="dim"
            )
        )

    if report.files:
        files = Table(title=f"files ({len(report.files)}, {report.total_bytes:,} bytes)", title_justify="left")
        files.add_column("path")
        files.add_column("bytes", justify="right")
        files.add_column("sha256")
        for item in report.files:
            files.add_row(_safe(item.path), f"{item.size:,}", item.sha256[:16])
        console.print(files)
    if report.run_config:
        config = Table(title="run config defaults (the server may override them per run)", title_justify="left")
        config.add_column("key")
        config.add_column("type")
        config.add_column("default")
        for default in report.run_config:
            shown = repr(default.value) if default.kind == "str" else default.value
            config.add_row(_safe(default.key), default.kind, _safe(shown))
        console.print(config)

    approval = {
        "no-list": "the policy has no [fab] approved list: any FAB that passes the checks is installed",
        "approved": "listed in the policy's [fab] approved list",
        "not-approved": "NOT in the policy's [fab] approved list",
    }[report.approval]
    console.print(Text.assemble(("approval  ", "bold"), approval))
    if report.accepted:
        console.print(
            Text.assemble(
                ("verdict   ", "bold"),
                ("ACCEPTED", "bold green"),
                f": would be installed read-only at <hospital>/fabs/{report.sha256}/",
            )
        )
    else:
        console.print(
            Text.assemble(
                ("verdict   ", "bold"), ("REFUSED", "bold red"), f" by rule {report.rule}: ", _safe(report.reason or "")
            )
        )
        for key, detail in report.detail:
            console.print(Text.assemble(f"          {key}: ", _safe(detail)))
    if report.accepted or report.rule == "fab-not-approved":
        console.print(
            Text(
                "To approve exactly this package, add its hash to the policy file:\n"
                f'  [fab]\n  approved = ["{report.fab_ref}"]',
                style="dim",
            )
        )


# One line per paragraph: rich keeps single newlines, and "\\[" keeps "[fab]" from being read as markup.
CHECK_HELP = (
    "Check a FAB by the hospital's rules and show what a hospital needs to decide.\n\n"
    "Prints the publisher, name and version, the hash in the form the policy takes (sha256:...), every file "
    "with its size, the ClientApp and ServerApp entry points, the run-config defaults, and the verdict with the "
    "rule that refused. Nothing of the "
    "FAB is written or run.\n\n"
    "Get the FAB from the research team, or build it yourself from the source they gave you with "
    "`flwr build --app APP_DIR` (set FLWR_DISABLE_UPDATE_CHECK=1 to keep it offline); the same source and Flower "
    "version build the same bytes, so the same hash.\n\n"
    "To approve a FAB: review this output (and its source), then add the printed hash to the policy file: "
    '\\[fab] approved = \\["sha256:..."]. With a list, every other FAB is refused.\n\n'
    "Exit status: 0 when `fedgate node` would install this FAB, 1 when it would refuse it, 2 on a usage error "
    "(a missing file, a bad policy)."
)


@fab_app.command("check", help=CHECK_HELP)
def check(
    fab: Annotated[
        Path,
        typer.Argument(
            help="The FAB file (from `flwr build --app APP_DIR`).", exists=True, dir_okay=False, readable=True
        ),
    ],
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="The hospital's policy file; its \\[fab] table sets the approved hashes and size limits.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON only.")] = False,
) -> None:
    """Check a FAB by the hospital's rules and show what a hospital needs to decide (CHECK_HELP)."""
    try:
        fab_policy = read_fab_policy(policy)
        report = _read_report(fab, fab_policy)
    except PolicyError as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"cannot read {fab}: {err}")
    if as_json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True, ensure_ascii=True))
    else:
        _print_report(fab, report)
    raise typer.Exit(0 if report.accepted else 1)
