"""`fedgate report`: the data-protection officer's report for one hospital's ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def report(
    ledger: Annotated[Path, typer.Argument(help="A hospital folder or its ledger folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the HTML report.")] = Path("report.html"),
) -> None:
    """Write one self-contained HTML report: what left, when, to whom, under which guarantees,
    and whether the ledger verifies (said in its first lines when it does not)."""
    from fedgate.report.render import write_report

    path = write_report(ledger, out)
    console.print(f"wrote {path}")
