"""`fedgate ledger verify | show | head | prove | check-proof | consistency | export`.

Every reader pins the hospital's key (`--public-key FILE` or `--fingerprint HEX`); `verify`,
`head` and `consistency` without a pin fall back to the key beside the ledger and say so
loudly; `check-proof` has no fallback at all."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fedgate.errors import LedgerError, LedgerVerificationError
from fedgate.ledger.export import export_bundle
from fedgate.ledger.formats import FormatError, SignedTreeHead
from fedgate.ledger.proof import check_consistency, check_proof, make_consistency_proof, make_proof
from fedgate.ledger.store import DB_FILE, Ledger
from fedgate.ledger.verify import VerifyResult, describe, ledger_verifier, verify_ledger

ledger_app = typer.Typer(
    help="Inspect and verify a hospital's ledger (PATH is its folder, e.g. runs/demo/hospital-0/ledger).",
    no_args_is_help=True,
)
# Never narrower than a ledger row: piped output is not cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

LedgerPath = Annotated[Path, typer.Argument(help="The ledger folder (holds ledger.sqlite, blobs/, signing.pub).")]
PublicKey = Annotated[
    Path | None, typer.Option("--public-key", help="The hospital's public key (PEM), obtained from the hospital.")
]
Fingerprint = Annotated[
    str | None, typer.Option("--fingerprint", help="The hospital's key fingerprint (SHA-256 of the key, 64 hex).")
]
UNPINNED = (
    "[bold yellow on red] key not pinned: trusting the key found beside the ledger [/] "
    "[yellow]anyone who can rewrite the ledger can replace that key too; pass --public-key or --fingerprint[/]"
)


def _resolve(path: Path) -> Path:
    """Accept the hospital folder too: its ledger lives in ./ledger."""
    return path / "ledger" if (path / "ledger" / DB_FILE).is_file() else path


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(message, soft_wrap=True)
    raise typer.Exit(code)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        _fail(f"[bold red]error[/]: cannot read {what} {path}: {err}", 2)


def _read_head(path: Path, what: str) -> SignedTreeHead:
    try:
        return SignedTreeHead.from_json(_read_json(path, what))
    except FormatError as err:
        _fail(f"[bold red]error[/]: {what} {path} is not a signed tree head: {err}", 2)


def _read_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        _fail(f"[bold red]error[/]: cannot read the public key {path}: {err}", 2)


def _verify(path: Path, public_key: Path | None, fingerprint: str | None, trusted: Path | None) -> VerifyResult:
    head = _read_head(trusted, "the trusted head") if trusted else None
    folder = _resolve(path)
    if public_key is None and fingerprint is None:
        err_console.print(UNPINNED, soft_wrap=True)
    try:
        result = verify_ledger(folder, _read_key(public_key), head, pinned_fingerprint=fingerprint)
    except LedgerVerificationError as err:
        where = f" (first broken entry: {err.seq})" if err.seq is not None else ""
        _fail(f"[bold red]LEDGER DOES NOT VERIFY[/]{where}: {err}")
    except LedgerError as err:
        _fail(f"[bold red]error[/]: {err}", 2)
    return result


@ledger_app.command()
def verify(
    path: LedgerPath,
    public_key: PublicKey = None,
    fingerprint: Fingerprint = None,
    trusted_head: Annotated[
        Path | None,
        typer.Option(help="A signed tree head kept earlier (`fedgate ledger head`, a report); it must still be there."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Recompute every hash, blob, the Merkle tree, every signature and the state. Exit 0 when
    whole; exit 1 naming the first broken entry otherwise; exit 2 when it cannot be checked."""
    result = _verify(path, public_key, fingerprint, trusted_head)
    if as_json:
        print(json.dumps(describe(result), indent=2))
        return
    console.print(
        f"[bold green]ledger verifies[/]: {result.entries:,} entries, {result.tree_heads:,} signed tree heads, "
        f"root {result.root}, key {result.key_id} ({'pinned' if result.pinned else '[yellow]NOT pinned[/]'})"
        + (", and it still contains the trusted head" if trusted_head else ""),
        soft_wrap=True,
    )
    if not trusted_head:
        console.print(
            "keep the latest signed head (`fedgate ledger head PATH > head.json`) and pass it next time as "
            "--trusted-head: only that catches a ledger cut back to an earlier point"
        )


@ledger_app.command()
def head(path: LedgerPath, public_key: PublicKey = None, fingerprint: Fingerprint = None) -> None:
    """Verify the ledger, then print its latest signed tree head as JSON: keep it, and pass it
    as the next `verify --trusted-head` (or `consistency`)."""
    result = _verify(path, public_key, fingerprint, None)
    print(json.dumps(result.latest_head.to_json(), indent=2))


def _bits(value: object) -> str:
    try:
        bits = float(str(value))
    except ValueError:
        return str(value)
    if math.isinf(bits) or math.isnan(bits):
        return "unbounded"
    return f"{bits:,.0f}"


def _field(record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _row(e: dict[str, Any]) -> list[str]:
    """One table row, read defensively: `show` lists a ledger before anyone verified it."""
    decision = _field(e, "decision")
    bound = _field(decision, "bound")
    payloads = _field(e, "payloads")
    size = sum(p.get("size", 0) for p in payloads.values() if isinstance(p, dict) and isinstance(p.get("size"), int))
    outcome = decision.get("rule") or e.get("status") or ""
    bits = bound.get("total_bits")
    return [
        str(e.get("seq", "")),
        str(e.get("time", ""))[:19].replace("T", " "),
        str(e.get("run_id", "")),
        str(e.get("round", "")),
        str(e.get("kind", "")),
        str(e.get("message_type", "")),
        str(e.get("destination", "")),
        str(outcome),
        str(e.get("reviewer") or ""),
        "" if bits is None else _bits(bits),
        f"{size:,}",
    ]


@ledger_app.command()
def show(
    path: LedgerPath,
    round_: Annotated[int | None, typer.Option("--round", help="Only entries of this round.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON lines.")] = False,
) -> None:
    """List the entries: what left (or was refused), when, to whom, who reviewed it, under
    which bound. Read as stored: run `verify` to know they are genuine."""
    try:
        with Ledger(_resolve(path), create=False) as ledger:
            entries = [e for e in ledger.entries() if round_ is None or e.get("round") == round_]
    except LedgerError as err:
        _fail(f"[bold red]error[/]: {err}", 2)
    if as_json:
        for entry in entries:
            print(json.dumps(entry, sort_keys=True))
        return
    table = Table(title=f"{path}: {len(entries):,} entries")
    columns = ("seq", "time (UTC)", "run", "round", "kind", "type", "destination", "rule / review", "reviewer")
    for column in columns:
        table.add_column(column, overflow="fold")
    table.add_column("bits", justify="right", overflow="fold")
    table.add_column("bytes", justify="right", overflow="fold")
    for e in entries:
        table.add_row(*_row(e))
    console.print(table)


@ledger_app.command()
def prove(path: LedgerPath, seq: Annotated[int, typer.Argument(help="The entry to prove.")]) -> None:
    """Print an inclusion proof for entry SEQ as JSON, checkable with `check-proof`."""
    try:
        print(json.dumps(make_proof(_resolve(path), seq), indent=2))
    except LedgerError as err:
        _fail(f"[bold red]error[/]: {err}", 2)


@ledger_app.command("check-proof")
def check_proof_cmd(
    proof: Annotated[Path, typer.Argument(help="The proof JSON (from `fedgate ledger prove`); - for stdin.")],
    public_key: PublicKey = None,
    fingerprint: Fingerprint = None,
) -> None:
    """Check an inclusion proof: the entry is in the tree the hospital signed. Needs the
    hospital's key or its fingerprint: the key inside the proof is never trusted alone."""
    if public_key is None and fingerprint is None:
        _fail("[bold red]error[/]: pass --public-key FILE or --fingerprint HEX (the hospital's key)", 2)
    document = _read_json(proof, "the proof")
    try:
        result = check_proof(document, _read_key(public_key), pinned_fingerprint=fingerprint)
    except LedgerVerificationError as err:
        _fail(f"[bold red]PROOF DOES NOT CHECK[/]: {err}")
    except LedgerError as err:
        _fail(f"[bold red]error[/]: {err}", 2)
    console.print(
        f"[bold green]proof checks[/]: entry {result['seq']} is in the signed tree of {result['tree_size']:,} entries "
        f"(root {result['root']}, key {result['key_id']})",
        soft_wrap=True,
    )


@ledger_app.command()
def consistency(
    old_head: Annotated[Path, typer.Argument(help="A signed tree head kept earlier (`fedgate ledger head`).")],
    path: LedgerPath,
    public_key: PublicKey = None,
    fingerprint: Fingerprint = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the consistency proof document.")] = False,
) -> None:
    """Prove (RFC 9162 consistency proof) that the ledger's latest signed head extends OLD_HEAD:
    the same history with entries appended, nothing rewritten or removed."""
    old = _read_head(old_head, "the old head")
    folder = _resolve(path)
    if public_key is None and fingerprint is None:
        err_console.print(UNPINNED, soft_wrap=True)
    try:
        verifier, _ = ledger_verifier(folder, _read_key(public_key), fingerprint)
        document = make_consistency_proof(folder, old)
        result = check_consistency(document, verifier)
    except LedgerVerificationError as err:
        _fail(f"[bold red]NOT CONSISTENT[/]: {err}")
    except LedgerError as err:
        _fail(f"[bold red]error[/]: {err}", 2)
    if as_json:
        print(json.dumps(document, indent=2))
        return
    console.print(
        f"[bold green]consistent[/]: the signed tree of {result['new_size']:,} entries (root {result['new_root']}) "
        f"extends the old tree of {result['old_size']:,} (root {result['old_root']}); "
        f"proof of {len(document['proof'])} hashes checks under key {result['key_id']}",
        soft_wrap=True,
    )


@ledger_app.command()
def export(path: LedgerPath, out: Annotated[Path, typer.Argument(help="A new folder for the bundle.")]) -> None:
    """Write an auditor's bundle (entries, heads, state, blobs, public key, latest tree head;
    no private key), all from one consistent snapshot."""
    try:
        count = export_bundle(_resolve(path), out)
    except LedgerError as err:
        _fail(f"[bold red]error[/]: {err}", 2)
    console.print(
        f"exported {count:,} entries to {out}; on another machine: "
        f"fedgate ledger verify {out} --fingerprint <the hospital's key fingerprint>"
    )
