"""`fedgate node`: run beside `flower-supernode --isolation process` at a hospital."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from fedgate.errors import FedgateError
from fedgate.policy import load_policy


def node(
    runtime_api_address: Annotated[str, typer.Option(help="The SuperNode's runtime API (its --host:--port).")],
    hospital_dir: Annotated[
        Path, typer.Option(help="This hospital's folder: ledger, keys, review queue, installed apps, sandbox logs.")
    ],
    data_dir: Annotated[
        Path, typer.Option(help="The data folder the ClientApp may read (read-only inside the sandbox).")
    ],
    destination: Annotated[str, typer.Option(help="Where replies go (the SuperLink address), for the ledger.")],
    policy: Annotated[Path | None, typer.Option(help="The hospital's policy TOML (default: the shipped one).")] = None,
    insecure: Annotated[bool, typer.Option(help="Talk to the runtime API without TLS (loopback only).")] = False,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate of the runtime API's TLS.")] = None,
    superexec_auth_secret_file: Annotated[
        Path | None, typer.Option(help="Shared secret file, as given to flower-supernode --superexec-auth-secret-file.")
    ] = None,
    allow_root: Annotated[
        bool,
        typer.Option(
            "--allow-root",
            help="Run even as root (discouraged: run as a dedicated user). The sandbox then drops to an "
            "unprivileged uid of its own, and every ledger entry records that the node ran as root.",
        ),
    ] = False,
    hospital_data: Annotated[
        Path | None,
        typer.Option(
            help="Trusted mode: a JSON file naming the images fedgate's own trainer uses (overrides [training] "
            "dataset; `fedgate demo --deploy --trusted` writes one per simulated hospital).",
            hidden=True,
        ),
    ] = None,
) -> None:
    """Execute the SuperNode's ClientApp tasks: admitted by the gate, the research team's app
    package checked and installed by the hospital's rules, run in a sandbox, gated, recorded.

    Replaces Flower's SuperExec + flwr-clientapp. Start it next to
    `flower-supernode --isolation process --port P`; only the SuperNode talks to the outside.
    Check the host first with `fedgate sandbox check`."""
    from fedgate.executor.node import NodeConfig, serve

    if not insecure and root_certificates is None:
        raise FedgateError("pass --root-certificates for the runtime API's TLS, or --insecure on loopback")
    if not data_dir.is_dir():
        raise FedgateError(f"--data-dir {data_dir} is not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = NodeConfig(
        runtime_api_address=runtime_api_address,
        hospital_dir=hospital_dir.resolve(),
        data_dir=data_dir.resolve(),
        policy=load_policy(policy),
        destination=destination,
        insecure=insecure,
        root_certificates=root_certificates.read_bytes() if root_certificates else None,
        superexec_auth_secret=superexec_auth_secret_file.read_bytes() if superexec_auth_secret_file else None,
        allow_root=allow_root,
        hospital_data=_hospital_data(hospital_data),
    )
    serve(config)


def _hospital_data(path: Path | None) -> Any:
    if path is None:
        return None
    import json

    from fedgate.data.hospital import HospitalData

    try:
        return HospitalData.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedgateError(f"--hospital-data {path}: {err}") from err
