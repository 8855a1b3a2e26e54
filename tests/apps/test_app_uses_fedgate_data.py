"""The reference app reads the hospital's data through fedgate.data, and the trusted trainer's
`hospital_dataset` gives exactly the share the gated app trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedgate.data.loaders
import fedgate.data.partition
import fedgate_medical.data
import fedgate_medical.partition
from fedgate.data import ShareSpec, global_test_dataset, hospital_dataset
from fedgate_medical.task import AppConfig, global_test_data, hospital_data


def test_app_names_are_fedgates_objects() -> None:
    for name in fedgate_medical.data.__all__:
        assert getattr(fedgate_medical.data, name) is getattr(fedgate.data.loaders, name)
    for name in fedgate_medical.partition.__all__:
        assert getattr(fedgate_medical.partition, name) is getattr(fedgate.data.partition, name)
    assert issubclass(fedgate_medical.data.DataError, ValueError)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, count in (("no", 70), ("yes", 50)):
        (root / cls).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize(("scheme", "subset"), [("dirichlet", 0), ("iid", 90)])
def test_hospital_dataset_is_the_apps_share(folder: Path, scheme: str, subset: int) -> None:
    cfg = AppConfig(dataset=f"folder:{folder}", image_size=16, subset=subset, partition=scheme, alpha=0.7, seed=3)
    for hospital in range(3):
        mine = hospital_dataset(
            cfg.dataset, hospital, 3, image_size=16, subset=subset, partition=scheme, alpha=0.7, seed=3
        )
        apps = hospital_data(cfg, hospital, 3)
        for ours, theirs in zip(mine, apps, strict=True):
            assert np.array_equal(ours.images, theirs.images) and np.array_equal(ours.labels, theirs.labels)
    share = ShareSpec(cfg.dataset, 16, subset, scheme, 0.7, 0.2, 3)
    assert np.array_equal(global_test_dataset(share, 3).images, global_test_data(cfg, 3).images)


def test_hospital_index_out_of_range(folder: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        hospital_dataset(f"folder:{folder}", 3, 3, image_size=16)
