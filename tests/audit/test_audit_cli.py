"""`fedgate audit`: one JSON object with the documented keys; pictures only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from audit_fixtures import one_thread, shapes  # noqa: F401  (one_thread: an autouse fixture)
from fedgate.cli.audit_cmd import audit

app = typer.Typer()
app.command()(audit)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for label, name in enumerate(("no", "yes")):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(shapes(12, seed=label)):
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def _run(folder: Path, *extra: str) -> tuple[int, str]:
    args = ["--data", f"folder:{folder}", "--image-size", "16", "--steps", "3", "--seed", "0", "--image-index", "2"]
    result = CliRunner().invoke(app, [*args, *extra], env={"COLUMNS": "200"})
    return result.exit_code, result.stdout


def test_json_prints_exactly_one_object_with_the_documented_keys(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, out = _run(folder, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert set(summary) == {"verdict", "psnr", "ssim", "rank", "null_rank", "candidates", "seconds"}
    assert summary["verdict"] in ("re-identifiable", "not-distinguishable")
    assert summary["candidates"] == 24
    assert all(isinstance(summary[k], int) for k in ("rank", "null_rank", "candidates"))
    assert all(isinstance(summary[k], float) for k in ("ssim", "seconds"))
    assert sorted(tmp_path.rglob("*")) == before  # no picture written unless asked


def test_with_images_writes_the_pictures_and_warns(folder: Path, tmp_path: Path) -> None:
    code, out = _run(folder, "--unprotected", "--with-images", str(tmp_path / "pictures"))
    assert code == 0, out
    assert "re-identifiable" in out or "not-distinguishable" in out
    assert "patient image" in out
    written = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert written == ["null.png", "reconstruction.png", "true-reconstruction-null.png", "true.png"]


def test_policy_protection_is_used(folder: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[update]\nclip_norm = 2.0\nnoise_multiplier = 0.5\nnoise_mode = "distributed"\nhospitals = 4\n')
    code, out = _run(folder, "--policy", str(policy))
    assert code == 0, out
    assert "clip 2, noise multiplier 0.5, sigma 0.5" in " ".join(out.split())


def test_help_explains_the_numbers() -> None:
    out = CliRunner().invoke(app, ["--help"]).stdout
    assert "null rank" in out and "blind guess" in out and "PSNR" in out


def test_trusted_audits_dp_sgd_at_the_policy_floor(folder: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[training]\nmode = "trusted"\nmin_noise_multiplier = 0.8\nmax_grad_norm_ceiling = 3.0\n')
    code, out = _run(folder, "--policy", str(policy), "--trusted")
    assert code == 0, out
    assert "DP-SGD: per-sample clip 3, noise multiplier 0.8" in " ".join(out.split())
    code, _ = _run(folder, "--trusted", "--unprotected")
    assert code != 0
