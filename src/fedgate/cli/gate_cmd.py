"""`fedgate gate status | resume`: what a hospital's gate remembers, and clearing a halt."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedgate.errors import FedgateError
from fedgate.gate.entries import KIND_RESUME
from fedgate.gate.pipeline import LEDGER_DIR, hold_gate_lock
from fedgate.gate.state import GateState
from fedgate.ledger.store import Ledger

gate_app = typer.Typer(
    help="A hospital's gate state: cumulative bits, halt, pinned model, its own round counter. It lives in the "
    "hospital's ledger (signed with every head), so neither a new run nor the server can reset it.",
    no_args_is_help=True,
)
console = Console()
HospitalDir = Annotated[Path, typer.Argument(help="The hospital's folder (holds ledger/).")]


def _open(folder: Path) -> Ledger:
    if not (folder / LEDGER_DIR / "ledger.sqlite").is_file():
        raise FedgateError(f"{folder} holds no hospital ledger ({folder / LEDGER_DIR / 'ledger.sqlite'} is missing)")
    return Ledger(folder / LEDGER_DIR, create=False)


@gate_app.command()
def status(folder: HospitalDir, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show the gate's state as its latest signed tree head commits to it."""
    with _open(folder) as ledger:
        state = GateState.from_json(ledger.state())
    if as_json:
        print(json.dumps(state.to_json(), indent=2))
        return
    table = Table(title=f"gate of {folder}", show_header=False)
    bits = "unbounded" if math.isinf(state.cumulative_bits) else f"{state.cumulative_bits:,.0f}"
    table.add_row("cumulative bound", f"{bits} bits over {state.replies} replies ({state.refused} refused)")
    table.add_row("halted", f"[bold red]yes[/]: {state.halt_reason}" if state.halted else "no")
    table.add_row("pinned model", state.pinned_manifest or "none yet (the first train reply pins it)")
    for manifest, rounds in state.rounds.items():
        table.add_row("train replies", f"{rounds} for model {manifest[:16]}…")
    console.print(table)


@gate_app.command()
def resume(
    folder: HospitalDir,
    operator: Annotated[str, typer.Option(help="Your name, recorded in the ledger.")],
    reason: Annotated[str, typer.Option(help="Why the halt may be lifted, recorded in the ledger.")],
) -> None:
    """Lift a halt (policy `on_refusal = "halt"`). Stop the node (or run) first: only one
    process may hold a hospital's gate. The resumption is a ledger entry of its own."""
    if not operator.strip() or not reason.strip():
        raise FedgateError("--operator and --reason must not be empty: both go into the ledger")
    lock = hold_gate_lock(folder)
    try:
        with _open(folder) as ledger:
            state = GateState.from_json(ledger.state())
            if not state.halted:
                console.print("the gate is not halted; nothing recorded")
                return
            resumed = GateState.from_json({**state.to_json(), "halted": False, "halt_reason": ""})
            fields = {"kind": KIND_RESUME, "operator": operator.strip(), "reason": reason.strip(),
                      "was": state.halt_reason}  # fmt: skip
            receipt = ledger.append(fields, state=resumed.to_json())
    finally:
        lock.close()
    console.print(f"[green]resumed[/]: ledger entry {receipt.seq}; the halt was: {state.halt_reason}")
