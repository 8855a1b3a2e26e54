"""`fedgate ledger verify | show | prove | check-proof | export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedgate.errors import LedgerVerificationError
from fedgate.ledger.export import export_bundle
from fedgate.ledger.proof import check_proof, make_proof
from fedgate.ledger.store import Ledger, SignedTreeHead
from fedgate.ledger.verify import verify_ledger

ledger_app = typer.Typer(
    help="Inspect and verify a hospital's ledger (PATH is its folder, e.g. runs/demo/hospital-0/ledger).",
    no_args_is_help=True,
)
console = Console()

LedgerPath = Annotated[Path, typer.Argument(help="The ledger folder (holds ledger.sqlite, blobs/, signing.pub).")]


def _resolve(path: Path) -> Path:
    """Accept the hospital folder too: its ledger lives in ./ledger."""
    return path / "ledger" if (path / "ledger" / "ledger.sqlite").is_file() else path


@ledger_app.command()
def verify(
    path: LedgerPath,
    public_key: Annotated[
        Path | None, typer.Option(help="The hospital's public key (default: PATH/signing.pub).")
    ] = None,
    trusted_head: Annotated[
        Path | None, typer.Option(help="A tree head JSON seen earlier; the ledger must still contain it.")
    ] = None,
) -> None:
    """Recompute every hash, blob, the Merkle tree and every signature. Exit 0 when whole;
    exit 1 naming the first broken entry otherwise."""
    head = SignedTreeHead.from_json(json.loads(trusted_head.read_text())) if trusted_head else None
    try:
        result = verify_ledger(_resolve(path), public_key, head)
    except LedgerVerificationError as err:
        where = f" (first broken entry: {err.seq})" if err.seq is not None else ""
        console.print(f"[bold red]LEDGER DOES NOT VERIFY[/]{where}: {err}")
        sys.exit(1)
    console.print(
        f"[bold green]ledger verifies[/]: {result.entries} entries, {result.tree_heads} signed tree heads, "
        f"root {result.root[:16]}…, key {result.key_id[:16]}…"
    )


@ledger_app.command()
def show(
    path: LedgerPath,
    round_: Annotated[int | None, typer.Option("--round", help="Only entries of this round.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON lines.")] = False,
) -> None:
    """List the entries: what left (or was refused), when, to whom, under which bound."""
    with Ledger(_resolve(path), create=False) as ledger:
        entries = [e for e in ledger.entries() if round_ is None or e.get("round") == round_]
    if as_json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return
    table = Table(title=f"{path}: {len(entries)} entries")
    for column in ("seq", "time (UTC)", "round", "kind", "type", "rule", "bits", "bytes"):
        table.add_column(column)
    for e in entries:
        decision = e.get("decision", {})
        size = sum(p["size"] for p in e.get("payloads", {}).values())
        table.add_row(
            str(e["seq"]),
            e["time"][:19],
            str(e.get("round", "")),
            e.get("kind", ""),
            e.get("message_type", ""),
            decision.get("rule", ""),
            decision.get("bound", {}).get("total_bits", ""),
            f"{size:,}",
        )
    console.print(table)


@ledger_app.command()
def prove(path: LedgerPath, seq: Annotated[int, typer.Argument(help="The entry to prove.")]) -> None:
    """Print an inclusion proof for entry SEQ as JSON, checkable with `check-proof`."""
    print(json.dumps(make_proof(_resolve(path), seq), indent=2))


@ledger_app.command("check-proof")
def check_proof_cmd(
    proof: Annotated[Path, typer.Argument(help="The proof JSON (from `fedgate ledger prove`); - for stdin.")],
    public_key: Annotated[
        Path | None, typer.Option(help="Pin the hospital's public key instead of trusting the one in the proof.")
    ] = None,
) -> None:
    """Check an inclusion proof: the entry is in the tree the hospital signed."""
    document = json.loads(sys.stdin.read() if str(proof) == "-" else proof.read_text())
    try:
        result = check_proof(document, public_key.read_bytes() if public_key else None)
    except LedgerVerificationError as err:
        console.print(f"[bold red]PROOF DOES NOT CHECK[/]: {err}")
        sys.exit(1)
    console.print(
        f"[bold green]proof checks[/]: entry {result['seq']} is in the signed tree of {result['tree_size']} entries "
        f"(root {result['root'][:16]}…, key {result['key_id'][:16]}…)"
    )


@ledger_app.command()
def export(path: LedgerPath, out: Annotated[Path, typer.Argument(help="A new folder for the bundle.")]) -> None:
    """Write an auditor's bundle (entries, blobs, public key, latest tree head; no private key)."""
    count = export_bundle(_resolve(path), out)
    console.print(f"exported {count} entries to {out}; on another machine: fedgate ledger verify {out}")
