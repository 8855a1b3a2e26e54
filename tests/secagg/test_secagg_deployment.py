"""SecAgg+ run by the gates in a deployment (`fedgate demo --deploy`'s federation: SuperLink, one
SuperNode and one `fedgate node` per hospital, the app submitted with `flwr run`): the aggregate
against FedAvg of what the gates released, with one hospital dropped. Without noise, so the
gated replies can be computed here (clip only; the noise is what the simulation tests check).
Slow; needs the policy's [secagg] table and `fedgate node` installing the handler."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from secagg_apps import initial_model, update_for

from fedgate.policy import Policy
from fedgate.policy.model import default_policy_text
from fedgate.secagg.policy import with_secagg_table
from fedgate.secagg.records import secagg_summary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "secagg" not in {f.name for f in dataclasses.fields(Policy)}, reason="the [secagg] policy is not wired yet"
    ),
]
HERE = Path(__file__).resolve().parent
PYPROJECT = """[project]
name = "secagg-fab"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedgate"

[tool.flwr.app.components]
serverapp = "secagg_fab.server:app"
clientapp = "secagg_fab.apps:app"

[tool.flwr.app.config]
num-server-rounds = 1
num-hospitals = 0
metrics-file = ""
secagg-num-shares = 5
secagg-threshold = 3
fail-partitions = ""
update-scale = 0.01
model-file = ""
"""
SERVER = """from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from secagg_fab.apps import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    run_server(grid, context, int(config["num-server-rounds"]), int(config["secagg-num-shares"]),
               int(config["secagg-threshold"]))
"""


def gated(partition: int, clip: float = 1.0) -> list[np.ndarray]:
    """What the gate releases without noise: the ClientApp's reply, its update clipped to C."""
    start = initial_model()
    updates = update_for(partition, 1, [p.shape for p in start], 0.01)
    reply = [(p + u.astype(p.dtype)).astype(np.float64) for p, u in zip(start[:2], updates[:2], strict=True)]
    difference = [r - p.astype(np.float64) for r, p in zip(reply, start[:2], strict=True)]
    norm = math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in difference))
    return [p + d * min(1.0, clip / norm) for p, d in zip(start[:2], difference, strict=True)]


def test_deployment_aggregate_with_one_dropped(tmp_path: Path) -> None:
    from fedgate.executor.local_federation import run_local_deployment

    app = tmp_path / "app"
    (app / "secagg_fab").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "secagg_fab" / "__init__.py").write_text("")
    (app / "secagg_fab" / "apps.py").write_text((HERE / "secagg_apps.py").read_text())
    (app / "secagg_fab" / "server.py").write_text(SERVER)
    text = default_policy_text()
    assert "noise_multiplier = 0.01" in text
    policy = tmp_path / "policy.toml"
    policy.write_text(with_secagg_table(text.replace("noise_multiplier = 0.01", "noise_multiplier = 0.0"), 5))
    model_file = tmp_path / "final.npz"
    config = {"fail-partitions": "1", "model-file": str(model_file), "secagg-num-shares": 5, "secagg-threshold": 3}
    out = tmp_path / "federation"
    run_local_deployment(out, 5, 1, policy, config, Console(file=io.StringIO()), app_dir=app)
    final = np.load(model_file)
    survivors = [gated(p) for p in (0, 2, 3, 4)]
    for index in range(2):
        expected = np.mean([s[index] for s in survivors], axis=0)
        np.testing.assert_allclose(final[f"arr_{index}"], expected, rtol=0, atol=2e-6)
    summary = secagg_summary([out / f"hospital-{i}" for i in range(5)], _run_id(out))
    assert summary == {"enabled": True, "num_shares": 5, "threshold": 3, "dropped": ["hospital-1"]}


def _run_id(out: Path) -> int:
    import json

    return int(json.loads((out / "summary.json").read_text())["run_id"])
