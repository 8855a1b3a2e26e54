"""`fedgate`: run gated federations, manage the hospital's policy, check its ledger."""

from __future__ import annotations

import os

# Before anything imports flwr: no telemetry (it would try the network for 60 s), and one
# thread per process (two-core machines slow 10-40x when torch threads contend).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedgate.cli.audit_cmd import audit
from fedgate.cli.fab_cmd import fab_app
from fedgate.cli.gate_cmd import gate_app
from fedgate.cli.ledger_cmd import ledger_app
from fedgate.cli.node_cmd import node
from fedgate.cli.policy_cmd import policy_app
from fedgate.cli.report_cmd import report
from fedgate.cli.review_cmd import review
from fedgate.cli.sandbox_cmd import sandbox_app
from fedgate.errors import FedgateError
from fedgate.policy import load_policy

app = typer.Typer(
    help="fedgate: federated learning for medical imaging that a hospital can verify.\n\n"
    "Every reply a hospital sends passes the egress gate (manifest check, clipping, noise, "
    "quantised metrics, a bound in bits) and is recorded in a signed, tamper-evident ledger first.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(policy_app, name="policy")
app.add_typer(ledger_app, name="ledger")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(fab_app, name="fab")
app.add_typer(gate_app, name="gate")
app.command()(review)
app.command()(report)
app.command()(node)
app.command()(audit)
console = Console()
err_console = Console(stderr=True)

# The demo's settings, chosen by measurement (README, "What the demo does").
DEMO_CONFIG: dict[str, bool | int | float | str] = {
    "partition": "dirichlet",
    "alpha": 0.5,
    "local-epochs": 2,
    "lr": 0.001,
    # The hospitals evaluate on their validation splits after the last round only: every round it
    # cost 1.7 s of the demo's ~12.5 s rounds, and the per-round line is the server's evaluation.
    "evaluate-every": 0,
}


def _parse_config(pairs: list[str]) -> dict[str, bool | int | float | str]:
    """`key=value` pairs for the app's run config; values parse as TOML scalars would."""
    config: dict[str, bool | int | float | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FedgateError(f"--config takes KEY=VALUE, got {pair!r}")
        parsed: bool | int | float | str = value
        if value in ("true", "false"):
            parsed = value == "true"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    continue
        config[key] = parsed
    return config


def _final_table(summary: dict[str, Any]) -> Table:
    table = Table(
        title=f"fedgate: {summary['hospitals']} hospitals, {summary['rounds']} rounds, {summary['seconds']:.0f} s"
    )
    for column in ("hospital", "replies sent", "refused", "bits / train reply", "bits total"):
        table.add_column(column, justify="right" if column != "hospital" else "left")
    for name, egress in summary["egress"].items():
        per_reply = egress["bits_per_reply"]
        total = egress["bits_total"]
        table.add_row(
            name,
            str(egress["replies_sent"]),
            str(len(egress["refusals"])),
            "unbounded" if per_reply is None and egress["replies_sent"] else f"{per_reply or 0:,.0f}",
            "unbounded" if total is None else f"{total:,.0f}",
        )
    return table


def _run(
    client_app: str,
    server_app: str,
    hospitals: int,
    rounds: int,
    policy: Path | None,
    out: Path,
    config: dict[str, bool | int | float | str],
    verbose: bool,
    no_isolation: bool = False,
    data: Path | None = None,
) -> None:
    from fedgate.executor.simulation import RunSpec, run_federation

    if data is not None and not data.is_dir():
        raise FedgateError(f"--data {data} is not a folder")
    spec = RunSpec(
        client_app, server_app, hospitals, rounds, out, load_policy(policy), config, verbose,
        isolation="none" if no_isolation else "sandbox", data_dir=data.resolve() if data else None,
    )  # fmt: skip
    if no_isolation:
        err_console.print(
            "[bold red]--no-isolation: the ClientApp runs in Flower's own processes, unsandboxed. The gate still "
            "checks, clips and noises each reply, but a malicious ClientApp can get around it: NOTHING IS ENFORCED. "
            "The ledger, summary.json and the report say so.[/]"
        )
    _print_outcome(run_federation(spec, console), out)


def _print_outcome(summary: dict[str, Any], out: Path) -> None:
    """The final table, the accuracy, and one DPO report per hospital (written here)."""
    from fedgate.report.render import write_hospital_reports

    console.print(_final_table(summary))
    accuracy, auc = summary["final_accuracy"], summary["final_auc"]
    if accuracy is not None:
        console.print(f"final test accuracy [bold]{accuracy:.3f}[/], AUC {auc:.3f}")
    console.print(
        f"summary: {out / 'summary.json'}; ledgers: {out}/hospital-*/ledger (check with `fedgate ledger verify`)"
    )
    for path in write_hospital_reports(summary["hospitals_dirs"]):
        console.print(f"report for the data-protection officer: {path}")


@app.command()
def run(
    client_app: Annotated[
        str, typer.Option(help="The ClientApp to gate, as MODULE:ATTR.")
    ] = "fedgate_medical.client_app:app",
    server_app: Annotated[
        str, typer.Option(help="The ServerApp, as MODULE:ATTR (default: the reference FedAvg app).")
    ] = "fedgate_medical.server_app:app",
    hospitals: Annotated[int, typer.Option(help="Number of simulated hospitals (SuperNodes).")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 2,
    policy: Annotated[
        Path | None, typer.Option(help="Hospital policy TOML (default: the shipped policy; see `fedgate policy init`).")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Run folder: summary.json and one folder per hospital (ledger, evidence).")
    ] = Path("runs/latest"),
    config: Annotated[
        list[str] | None,
        typer.Option("--config", "-c", help="App run-config KEY=VALUE, e.g. -c subset=300 -c local-epochs=1."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    no_isolation: Annotated[
        bool,
        typer.Option(
            "--no-isolation",
            help="Run the ClientApp unsandboxed in Flower's processes (faster to start; NOTHING is enforced "
            "against a malicious ClientApp, and every record says so).",
        ),
    ] = False,
    data: Annotated[
        Path | None, typer.Option(help="A data folder the ClientApp may read (read-only in its sandbox).")
    ] = None,
) -> None:
    """Run any Flower ClientApp/ServerApp pair in simulation: each hospital's ClientApp in its
    own sandbox, every reply through that hospital's gate and into its ledger.

    Example: fedgate run --hospitals 3 --rounds 2 -c subset=300 --out runs/quick

    An --out folder that holds earlier runs is continued: the same hospitals, whose budgets,
    halts and pinned models carry over; each run writes OUT/runs/RUN_ID/ and OUT/summary.json.
    """
    _run(client_app, server_app, hospitals, rounds, policy, out, _parse_config(config or []), verbose, no_isolation,
         data)  # fmt: skip


@app.command()
def demo(
    hospitals: Annotated[int, typer.Option(help="Number of simulated hospitals.")] = 5,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 12,
    policy: Annotated[Path | None, typer.Option(help="Hospital policy TOML (default: the shipped policy).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/demo"),
    deploy: Annotated[
        bool,
        typer.Option(
            help="Run as separate processes on loopback: flower-superlink (TLS, SuperNode authentication), "
            "one flower-supernode + fedgate node (sandboxed ClientApp) per hospital, submitted with flwr run."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    no_isolation: Annotated[
        bool, typer.Option("--no-isolation", help="Unsandboxed ClientApps (for speed; nothing enforced).")
    ] = False,
    secagg: Annotated[
        bool,
        typer.Option(
            help="Secure aggregation run by each hospital's gate: Flower's SecAgg+ path (a legacy FedAvg with "
            "fedgate's SecAgg+ workflow), the server sees only the sum; the policy's [secagg] table, or a "
            "majority threshold."
        ),
    ] = False,
    trusted: Annotated[
        bool,
        typer.Option(
            help="Trusted training: no research-team code runs at the hospitals. The reference ServerApp sends a "
            "recipe (fedgate's small CNN, DP-SGD with noise multiplier 2.0, clip 1.0: per-patient epsilon <= 8 "
            "for every demo hospital over 12 rounds) with stock FedAvg; each hospital trains it with fedgate's "
            "own Opacus trainer, so the per-patient epsilon is enforced.",
        ),
    ] = False,
) -> None:
    """The main job: brain-MRI tumour classification (Br35H) across 5 hospitals with
    Dirichlet(0.5) label skew, each hospital's ClientApp sandboxed, every reply gated,
    clipped, noised and recorded."""
    config: dict[str, bool | int | float | str] = dict(DEMO_CONFIG)
    client_app, server_app = "fedgate_medical.client_app:app", "fedgate_medical.server_app:app"
    app_dir: Path | None = None
    scratch: Path | None = None
    hospital_data: dict[int, Path] | None = None
    if secagg and trusted:
        raise FedgateError("--secagg and --trusted together are not supported yet: choose one")
    if secagg:
        scratch, policy, app_dir, config = _secagg_demo(policy, hospitals, config, deploy)
        client_app, server_app = "fedgate_medical.client_app_legacy:app", "fedgate_medical.server_app_secagg:app"
    if trusted:
        scratch, policy, app_dir, hospital_data = _trusted_demo(policy, hospitals, config)
        server_app = "fedgate_medical.server_app_trusted:app"
    try:
        if deploy:
            from fedgate.executor.local_federation import APP_DIR, run_local_deployment

            summary = run_local_deployment(out, hospitals, rounds, policy, config, console, app_dir=app_dir or APP_DIR,
                                           hospital_data=hospital_data)  # fmt: skip
            _print_outcome(summary, out)
            return
        _run(
            client_app,
            server_app,
            hospitals,
            rounds,
            policy,
            out,
            config,
            verbose,
            no_isolation,
        )
    finally:
        if scratch is not None:  # the written policy and app copy: the ledgers hold the policy itself
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


def _secagg_demo(
    policy: Path | None, hospitals: int, config: dict[str, bool | int | float | str], deploy: bool
) -> tuple[Path, Path, Path | None, dict[str, bool | int | float | str]]:
    """(a scratch folder to remove after the run, the policy with [secagg] on written in it where
    the nodes can read it, the reference app with its SecAgg+ components for --deploy's FAB, the
    run config naming shares and threshold)."""
    import shutil
    import tempfile

    from fedgate.executor.local_federation import APP_DIR
    from fedgate.policy import parse_policy
    from fedgate.policy.model import default_policy_text
    from fedgate.secagg.policy import with_secagg_table

    folder = Path(tempfile.mkdtemp(prefix="fedgate-secagg-"))
    text = with_secagg_table(policy.read_text() if policy else default_policy_text(), hospitals)
    effective = parse_policy(text, str(policy or "default policy"))
    (folder / "policy.toml").write_text(text)
    app: Path | None = None
    if deploy:
        app = folder / "app"
        shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        pyproject = app / "pyproject.toml"
        pyproject.write_text(
            pyproject.read_text()
            .replace('"fedgate_medical.server_app:app"', '"fedgate_medical.server_app_secagg:app"')
            .replace('"fedgate_medical.client_app:app"', '"fedgate_medical.client_app_legacy:app"')
        )
    shares = hospitals
    console.print(
        f"SecAgg+: {shares} shares, threshold {effective.secagg.threshold}, noise mode {effective.noise_mode} "
        f"(t = {effective.secagg.assumed_honest} honest hospitals assumed in every sum)"
    )
    return folder, folder / "policy.toml", app, {**config, "secagg-num-shares": shares,
                                                 "secagg-threshold": effective.secagg.threshold}  # fmt: skip


def _trusted_demo(
    policy: Path | None, hospitals: int, config: dict[str, bool | int | float | str]
) -> tuple[Path, Path, Path, dict[int, Path]]:
    """(scratch folder, the policy with `[training] mode = "trusted"`, the reference app whose
    ServerApp sends a recipe (--deploy's FAB, which the nodes never install), and per simulated
    hospital the images it trains on (--deploy's nodes read them))."""
    import json
    import shutil
    import tempfile

    from fedgate.executor.local_federation import APP_DIR
    from fedgate.executor.trusted import simulated_hospital_data
    from fedgate.policy import parse_policy
    from fedgate.policy.model import default_policy_text
    from fedgate.training.policy import with_trusted_mode

    folder = Path(tempfile.mkdtemp(prefix="fedgate-trusted-"))
    folder.chmod(0o755)  # the nodes (their own user) read the policy and their data file
    text = with_trusted_mode(policy.read_text() if policy else default_policy_text())
    effective = parse_policy(text, str(policy or "default policy"))
    (folder / "policy.toml").write_text(text)
    app = folder / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('"fedgate_medical.server_app:app"', '"fedgate_medical.server_app_trusted:app"')
    )
    data: dict[int, Path] = {}
    for index in range(hospitals):
        path = folder / f"hospital-{index}-data.json"
        path.write_text(json.dumps(simulated_hospital_data(effective, config, index, hospitals).to_json()))
        data[index] = path
    training = effective.training
    console.print(
        "trusted mode: no research code runs at the hospitals; a recipe may use "
        f"{', '.join(training.allowed_models)}, noise multiplier >= {training.min_noise_multiplier}, "
        f"clip norm <= {training.max_grad_norm_ceiling}"
    )
    return folder, folder / "policy.toml", app, data


def _log_to_console() -> None:
    """fedgate's own warnings (a refusal, a reply held for review) as lines on stderr."""
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    logger = logging.getLogger("fedgate")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def main() -> None:
    _log_to_console()
    try:
        app()
    except FedgateError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}")  # "[update]" is text, not markup
        sys.exit(2)
    except ValueError as err:  # bad data or partition settings from the app's own loaders
        err_console.print(f"[bold red]error:[/] {escape(str(err))}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold yellow]stopped[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
