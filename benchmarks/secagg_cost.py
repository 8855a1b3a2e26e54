"""What secure aggregation run by the gates costs per round, as a ratio to a plain gated round,
in one run of this script: in Flower's simulation engine and as separate processes (deployment).

    nice -n 10 python benchmarks/secagg_cost.py [--modes simulation,deployment] [--hospitals 5]
                                                [--rounds 4] [--subset 1000] [--epochs 2]

Both federations in both modes: the reference app's training (SmallCNN, Br35H,
`fedgate_medical.task.train`), every hospital's ClientApp in its sandbox, every reply through its
gate and ledger, the shipped policy (SecAgg+ adds its `[secagg]` table as `fedgate demo --secagg`
does), a central evaluation after each round, no federated evaluation.
  plain    Message-API FedAvg without federated evaluation (written below) and
           `fedgate_medical.client_app`: 1 message per hospital per round
  secagg   `fedgate_medical.server_app_secagg` (fedgate's SecAgg+ workflow, stock legacy FedAvg)
           and `fedgate_medical.client_app_legacy`: 4 messages per hospital per round (setup,
           share keys, collect masked vectors, unmask), the first, second and fourth answered by
           the gate alone (recorded in its ledger), masks from ChaCha20
Simulation runs through `fedgate.executor.simulation.run_federation` (what `fedgate demo --secagg`
runs); deployment through `run_local_deployment` (what `fedgate demo --secagg --deploy` runs).
A round's time is the time between two central evaluations (the metrics file's timestamps);
the ratio is of the medians over the steady rounds (round 1 also starts every sandbox).

Where the time goes: in simulation the hospitals live in this process, so their gates are
timed here, stage by stage; in deployment each hospital's ledger times its stages (when each
stage's reply was recorded, when the collect instruction arrived and when its reply left), and
the gaps between one stage's reply and the next stage's arrival are Flower's transport: the
SuperLink, the SuperNode's pull (every few seconds when idle) and the fedgate node's poll."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
PLAIN_MODULE = "server_app_noeval"  # in deployment: beside the reference app, in its FAB
PLAIN_PACKAGE = "fgbench_plain"  # in simulation: a package of its own, bound into the server's sandbox
PLAIN_SOURCE = '''"""The reference ServerApp without federated evaluation (written by benchmarks/secagg_cost.py)."""

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedgate_medical.task import AppConfig, evaluate, global_test_data, new_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(dict(context.run_config))
    n = cfg.num_hospitals or len(list(grid.get_node_ids()))
    test_set, model = global_test_data(cfg, n), new_model(cfg)

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy, auc = evaluate(model, test_set)
        line = {"round": server_round, "loss": loss, "accuracy": accuracy, "auc": auc, "time": time.time()}
        with Path(cfg.metrics_file).open("a") as handle:
            handle.write(json.dumps(line) + "\\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_server_rounds,
                   train_config=ConfigRecord({"lr": cfg.lr}), evaluate_fn=central)
'''


class GateTimer:
    """Seconds spent in the hospitals' gates (simulation: they live in this process), by stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def add(self, what: str, seconds: float) -> None:
        with self.lock:
            self.seconds[what].append(seconds)


CURRENT = GateTimer()


def install_timers() -> None:
    """Wrap the hospital's entry points once; each run reads its own `CURRENT` timer."""
    from fedgate.executor.hospital import Hospital
    from fedgate.flower_adapter import SECAGG_CONFIGS, message_from_bytes
    from fedgate.secagg.handler import SecAggHandler

    sandboxed, run_task, handler_run = Hospital.sandboxed, Hospital._run_task, SecAggHandler.run

    def timed_sandbox(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return sandboxed(self, *args, **kwargs)
        finally:
            CURRENT.add("sandbox (ClientApp)", time.perf_counter() - started)

    def timed_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return run_task(self, *args, **kwargs)
        finally:
            CURRENT.add("task (whole, at the hospital)", time.perf_counter() - started)

    def timed_stage(self: Any, hospital: Any, instruction: bytes, *args: Any) -> Any:
        message = message_from_bytes(instruction)
        stage = str(message.content[SECAGG_CONFIGS]["stage"]) if SECAGG_CONFIGS in message.content else "plain"
        started = time.perf_counter()
        try:
            return handler_run(self, hospital, instruction, *args)
        finally:
            CURRENT.add(f"secagg {stage}", time.perf_counter() - started)

    Hospital.sandboxed = timed_sandbox  # type: ignore[method-assign]
    Hospital._run_task = timed_task  # type: ignore[method-assign]
    SecAggHandler.run = timed_stage  # type: ignore[method-assign]


def steady_round_seconds(lines: list[dict[str, Any]]) -> list[float]:
    times = [line["time"] for line in sorted(lines, key=lambda r: r["round"])]
    return [b - a for a, b in itertools.pairwise(times[1:])]  # rounds 2.. (round 1 also starts the sandboxes)


def app_copy(folder: Path, serverapp: str, clientapp: str) -> Path:
    """The reference app with other components (and the plain no-evaluation ServerApp beside them)."""
    app = folder / "app"
    shutil.copytree(ROOT / "apps" / "medical", app, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (app / "fedgate_medical" / f"{PLAIN_MODULE}.py").write_text(PLAIN_SOURCE)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace('"fedgate_medical.server_app:app"', f'"{serverapp}"')
    text = text.replace('"fedgate_medical.client_app:app"', f'"{clientapp}"')
    pyproject.write_text(text)
    return app


def secagg_policy(folder: Path, hospitals: int) -> Path:
    """The shipped policy with the `[secagg]` table `fedgate demo --secagg` adds (majority threshold)."""
    from fedgate.policy.model import default_policy_text
    from fedgate.secagg.policy import with_secagg_table

    folder.mkdir(parents=True, exist_ok=True)
    policy = folder / "policy.toml"
    policy.write_text(with_secagg_table(default_policy_text(), hospitals))
    return policy


def simulation(args: argparse.Namespace, tmp: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Both federations through `run_federation`, the hospitals (and so their gates) in this process."""
    global CURRENT
    from rich.console import Console

    from fedgate.executor.progress import METRICS_FILE
    from fedgate.executor.simulation import RunSpec, run_federation
    from fedgate.policy import load_policy

    # the server's sandbox binds only the ServerApp's own package: a copy of the reference app's,
    # renamed, with the plain ServerApp in it
    package = tmp / "plain-app" / PLAIN_PACKAGE
    reference = ROOT / "apps" / "medical" / "fedgate_medical"
    shutil.copytree(reference, package, ignore=shutil.ignore_patterns("__pycache__"))
    for module in [*package.glob("*.py")]:
        module.write_text(module.read_text().replace("fedgate_medical", PLAIN_PACKAGE))
    (package / "server.py").write_text(PLAIN_SOURCE.replace("fedgate_medical", PLAIN_PACKAGE))
    sys.path.insert(0, str(package.parent))  # found (never imported) here; the server's sandbox binds it
    install_timers()
    console = Console(stderr=True)
    timers: dict[str, GateTimer] = {}
    results: dict[str, Any] = {}
    for name, client, server, policy in (
        ("plain", "fedgate_medical.client_app:app", f"{PLAIN_PACKAGE}.server:app", None),
        ("secagg", "fedgate_medical.client_app_legacy:app", "fedgate_medical.server_app_secagg:app",
         secagg_policy(tmp / "secagg-policy", args.hospitals)),
    ):  # fmt: skip
        CURRENT = timers[name] = GateTimer()
        out = tmp / "simulation" / name
        spec = RunSpec(client, server, args.hospitals, args.rounds, out, load_policy(policy), config)
        run_federation(spec, console)
        (metrics,) = out.glob(f"runs/*/{METRICS_FILE}")
        results[name] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    report(args, "simulation", results)
    print("where the time goes at one hospital (per hospital per round, all rounds):")
    tasks = args.hospitals * args.rounds
    for name, timer in timers.items():
        spent = {what: sum(values) / tasks for what, values in timer.seconds.items()}
        for what, seconds in sorted(spent.items()):
            print(f"  {name:7s} {what:40s} {seconds * 1e3:9.1f} ms")
        gate = spent["task (whole, at the hospital)"] - spent["sandbox (ClientApp)"]
        print(f"  {name:7s} {'gate, ledger, masking (task - sandbox)':40s} {gate * 1e3:9.1f} ms")
    return results


def deployment(args: argparse.Namespace, tmp: Path, config: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from fedgate.executor.local_federation import run_local_deployment
    from fedgate.executor.progress import METRICS_FILE

    console = Console(stderr=True)
    policy = secagg_policy(tmp / "secagg-policy", args.hospitals)
    results: dict[str, Any] = {}
    stages: dict[str, list[float]] = {}
    for name, serverapp, clientapp, chosen in (
        ("plain", f"fedgate_medical.{PLAIN_MODULE}:app", "fedgate_medical.client_app:app", None),
        ("secagg", "fedgate_medical.server_app_secagg:app", "fedgate_medical.client_app_legacy:app", policy),
    ):
        app = app_copy(tmp / "deployment" / name, serverapp, clientapp)
        out = tmp / "deployment" / name / "federation"
        try:
            run_local_deployment(out, args.hospitals, args.rounds, chosen, config, console, app_dir=app)
        except Exception as err:  # the rounds may all be in: measure them, and say what failed after
            print(f"  ({name}: the run ended with {type(err).__name__}: {err}; measured from its metrics file)")
        (metrics,) = out.glob(f"runs/*/{METRICS_FILE}")
        results[name] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if name == "secagg":
            stages = ledger_timeline([out / f"hospital-{i}" for i in range(args.hospitals)])
    report(args, "deployment", results)
    print("where a SecAgg round's time goes (medians over hospitals and rounds, from their ledgers):")
    for what, values in stages.items():
        print(f"  {what:58s} {statistics.median(values):7.2f} s")
    return results


def ledger_timeline(hospital_dirs: list[Path]) -> dict[str, list[float]]:
    """Per hospital and round, from its ledger's own clock: when each key stage's reply was
    recorded, when the collect instruction arrived and when the masked reply was released."""
    from fedgate.ledger.store import Ledger

    def seconds(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    gaps: dict[str, list[float]] = defaultdict(list)
    for folder in hospital_dirs:
        with Ledger(folder / "ledger", create=False) as ledger:
            entries = ledger.entries()
        rounds: dict[str, dict[str, float]] = defaultdict(dict)
        for entry in entries:
            group = str(entry.get("instruction", {}).get("group_id", ""))
            if entry["kind"] == "secagg-reply":
                rounds[group][entry["stage"]] = seconds(entry["time"])
            elif entry["kind"] == "reply-sent" and entry["decision"]["message_type"] == "train":
                rounds[group]["collect arrived"] = float(entry["instruction"]["arrived"])
                rounds[group]["collect left"] = float(entry["release"]["at"])
        for t in rounds.values():
            if {"setup", "share_keys", "collect arrived", "collect left", "unmask"} <= set(t):
                gaps["setup reply -> share_keys reply (one round trip)"].append(t["share_keys"] - t["setup"])
                gaps["share_keys reply -> collect arrives (one round trip)"].append(
                    t["collect arrived"] - t["share_keys"]
                )
                gaps["collect arrives -> masked reply leaves (ClientApp, gate)"].append(
                    t["collect left"] - t["collect arrived"]
                )
                gaps["masked reply -> unmask reply (slowest hospital + one trip)"].append(
                    t["unmask"] - t["collect left"]
                )
    return gaps


def report(args: argparse.Namespace, where: str, results: dict[str, Any]) -> None:
    plain, secure = (statistics.median(steady_round_seconds(results[k])) for k in ("plain", "secagg"))
    target = 1.2 if where == "simulation" else 1.5
    print(f"{where}: {args.hospitals} hospitals, {args.rounds} rounds, subset {args.subset or 'all'}, {args.epochs} "
          f"epochs; medians of the steady rounds (2..{args.rounds})")  # fmt: skip
    for name in ("plain", "secagg"):
        rounds = ", ".join(f"{s:.2f}" for s in steady_round_seconds(results[name]))
        print(f"  {name:6s} round {statistics.median(steady_round_seconds(results[name])):7.2f} s   "
              f"(steady rounds: {rounds}; final accuracy {results[name][-1]['accuracy']:.3f})")  # fmt: skip
    verdict = "within" if secure / plain <= target else "OVER"
    print(f"  ratio         {secure / plain:7.2f} x   (target <= {target} x: {verdict})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="simulation,deployment", help="simulation, deployment or both")
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--subset", type=int, default=1000, help="images in the whole data set (0: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"simulation", "deployment"}:
        parser.error("--modes: simulation, deployment or both (comma-separated)")
    threshold = args.hospitals // 2 + 1
    config: dict[str, Any] = {"subset": args.subset, "local-epochs": args.epochs, "secagg-num-shares": args.hospitals,
                              "secagg-threshold": threshold}  # fmt: skip
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="fg-secagg-cost-", dir=args.workdir) as tmp:
        for mode in modes:
            (simulation if mode == "simulation" else deployment)(args, Path(tmp), config)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
