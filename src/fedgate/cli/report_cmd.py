"""`fedgate report`: the data-protection officer's report for one hospital's ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedgate.errors import FedgateError, LedgerError

console = Console()
err_console = Console(stderr=True)


def report(
    ledger: Annotated[Path, typer.Argument(help="A hospital folder or its ledger folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the HTML report.")] = Path("report.html"),
    public_key: Annotated[
        Path | None, typer.Option("--public-key", help="The hospital's public key (PEM), obtained from the hospital.")
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option("--fingerprint", help="The hospital's key fingerprint (SHA-256 of the key, 64 hex).")
    ] = None,
    trusted_head: Annotated[
        Path | None,
        typer.Option(help="A signed tree head kept from an earlier report (its JSON); the ledger must still hold it."),
    ] = None,
    with_images: Annotated[
        bool,
        typer.Option(
            "--with-images",
            help="Show the leakage audit's pictures (true | reconstruction | null). They are patient images: "
            "the report says so on its first line; keep it at the hospital.",
        ),
    ] = False,
) -> None:
    """Write one self-contained HTML report: what left, when, to whom, under which bound and
    isolation, and whether the ledger verifies against the key you pin (its first line says
    so when it does not, and the command exits 1). It embeds the latest signed tree head:
    keep it for next time."""
    from fedgate.ledger.formats import FormatError, SignedTreeHead
    from fedgate.report.facts import read_facts
    from fedgate.report.render import render_facts

    head = None
    if trusted_head is not None:
        try:
            head = SignedTreeHead.from_json(json.loads(trusted_head.read_text(encoding="utf-8")))
        except FormatError as err:
            raise LedgerError(f"{trusted_head} is not a signed tree head: {err}") from err
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise LedgerError(f"cannot read the trusted head {trusted_head}: {err}") from err
    key = None
    if public_key is not None:
        try:
            key = public_key.read_bytes()
        except OSError as err:
            raise LedgerError(f"cannot read the public key {public_key}: {err}") from err
    facts = read_facts(ledger, public_key=key, fingerprint=fingerprint, trusted_head=head)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_facts(facts, with_images=with_images), encoding="utf-8")
    except OSError as err:
        raise FedgateError(f"cannot write the report to {out}: {err}") from err
    if not facts.verification.pinned:
        err_console.print(
            "[bold yellow on red] key not pinned: trusting the key found beside the ledger [/] "
            "[yellow]pass --public-key or --fingerprint; the report says so too[/]",
            soft_wrap=True,
        )
    if not facts.verification.verified:
        console.print(f"[bold red]LEDGER DOES NOT VERIFY[/]: {escape(facts.verification.message)}")
        console.print(f"wrote {escape(str(out))} (its first line says so)")
        raise typer.Exit(1)
    console.print(f"[green]ledger verifies[/] (key {facts.verification.fingerprint}); wrote {escape(str(out))}")
    if with_images:
        err_console.print("[bold yellow]the report carries patient images[/]: keep it at the hospital")
