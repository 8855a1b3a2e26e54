"""`fedgate review`: serve the review page for the queues under a run or hospital folder."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedgate.errors import FedgateError

console = Console()


def review(
    folder: Annotated[Path, typer.Argument(help="A run folder (e.g. runs/demo) or one hospital's folder.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    host: Annotated[
        str, typer.Option(help="Loopback address to bind (the page is never exposed further).")
    ] = "127.0.0.1",
) -> None:
    """Serve the review page: replies the gate holds, with approve / reject.

    Prints a link with a one-off access token; every request needs it. Bound to loopback
    only: reach it from another machine through an SSH tunnel, not by exposing it."""
    import uvicorn

    from fedgate.review.app import create_app

    if not ipaddress.ip_address(host).is_loopback:
        raise FedgateError(f"--host must be a loopback address (127.0.0.1 or ::1), got {host}")
    if not folder.is_dir():
        raise FedgateError(f"{folder} is not a folder")
    app, site = create_app(folder)
    console.print(f"fedgate review: open [bold]http://{host}:{port}/?token={site.token}[/] (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
