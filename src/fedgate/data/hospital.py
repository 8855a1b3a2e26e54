"""One hospital's share of a dataset, derived from configuration alone.

Mirrors `fedgate_medical.task.hospital_data` step for step (stratified subset, held-out global
test split, IID/Dirichlet partition, 90/10 train/validation cut), so that the hospital's own
trainer in trusted mode trains on exactly the images the gated reference app would, without
importing that app. `tests/apps/test_app_uses_fedgate_data.py` holds the two equal."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgate.data.loaders import ImageSet, LazyImages, lazy_dataset, load_dataset
from fedgate.data.partition import Split, partition

NODE_CONFIG_KEY = "fedgate.hospital-data"  # how the executor hands a HospitalData (JSON) to the trusted app
EXPECTED_KEY = "fedgate.expected-train-set"  # {"num_examples", "sha256"}: what the hospital accounted for


@dataclass(frozen=True)
class ShareSpec:
    """Everything that decides which images a simulated hospital holds (the reference app's
    `AppConfig.data_key()`, field for field)."""

    dataset: str = "br35h"
    image_size: int = 64
    subset: int = 0  # 0 = all images; else a seeded random subset of this many
    partition: str = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0


@functools.lru_cache(maxsize=4)
def _dataset(spec: str, size: int, subset: int, seed: int) -> LazyImages:
    data = lazy_dataset(spec, size)
    if subset and subset < len(data):
        rng = np.random.default_rng([seed, 4])
        return data.select(np.sort(rng.permutation(len(data))[:subset]))
    return data


@functools.lru_cache(maxsize=4)
def _whole(spec: str, size: int) -> ImageSet:
    """A real hospital's whole dataset, read once per process: what its ε was planned on."""
    return load_dataset(spec, size)


@functools.lru_cache(maxsize=16)
def _split(share: ShareSpec, n_hospitals: int) -> tuple[LazyImages, Split]:
    """The split is made on the labels alone: each caller decodes only the part it takes."""
    data = _dataset(share.dataset, share.image_size, share.subset, share.seed)
    return data, partition(data.labels, n_hospitals, share.partition, share.alpha, share.test_fraction, share.seed)


@functools.lru_cache(maxsize=32)
def _share(share: ShareSpec, n_hospitals: int, which: int) -> ImageSet:
    """Hospital `which`'s images (-1: the held-out test split), decoded once per process."""
    data, split = _split(share, n_hospitals)
    return data.take(split.test if which < 0 else split.hospitals[which])


def split_shares(share: ShareSpec, n_hospitals: int) -> tuple[ImageSet, tuple[ImageSet, ...]]:
    """(global test set, per-hospital sets); deterministic in `share`."""
    return _share(share, n_hospitals, -1), tuple(_share(share, n_hospitals, i) for i in range(n_hospitals))


def hospital_dataset(
    spec: str,
    hospital_index: int,
    n_hospitals: int,
    *,
    image_size: int = 64,
    subset: int = 0,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """A hospital's (train, local validation) sets: 90/10 of its share, as in the reference app.
    `spec` is a `load_dataset` spec (`br35h`, `npz:PATH`, `dicom:DIR`, `folder:DIR`)."""
    if not 0 <= hospital_index < n_hospitals:
        raise ValueError(f"hospital index {hospital_index} outside 0..{n_hospitals - 1}")
    share = ShareSpec(spec, image_size, subset, partition, alpha, test_fraction, seed)
    mine = _share(share, n_hospitals, hospital_index)
    order = np.random.default_rng([seed, 5, hospital_index]).permutation(len(mine))
    n_val = max(1, len(mine) // 10)
    return mine.subset(np.sort(order[n_val:])), mine.subset(np.sort(order[:n_val]))


def global_test_dataset(share: ShareSpec, n_hospitals: int) -> ImageSet:
    """The held-out split no hospital trains on (the server's evaluation set)."""
    return _share(share, n_hospitals, -1)


@dataclass(frozen=True)
class HospitalData:
    """The images trusted mode trains on, chosen by the hospital and never by the recipe: a
    whole dataset (`dataset`: a `load_dataset` spec; a real hospital), or in a simulation one
    simulated hospital's share (`share`, `index` of `hospitals`). Either way 90 % train, 10 %
    local validation (what evaluate instructions are answered on)."""

    dataset: str
    share: ShareSpec | None = None
    index: int = 0
    hospitals: int = 1

    def load(self, image_size: int) -> tuple[ImageSet, ImageSet]:
        """(train, validation) at `image_size` (the recipe's input size)."""
        if self.share is not None:
            s = self.share
            return hospital_dataset(
                s.dataset, self.index, self.hospitals, image_size=image_size, subset=s.subset,
                partition=s.partition, alpha=s.alpha, test_fraction=s.test_fraction, seed=s.seed,
            )  # fmt: skip
        data = _whole(self.dataset, image_size)
        order = np.random.default_rng([0, 5]).permutation(len(data))
        n_val = max(1, len(data) // 10)
        return data.subset(np.sort(order[n_val:])), data.subset(np.sort(order[:n_val]))

    def to_json(self) -> dict[str, Any]:
        share = None if self.share is None else dataclasses.asdict(self.share)
        return {"dataset": self.dataset, "share": share, "index": self.index, "hospitals": self.hospitals}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HospitalData:
        share = None if data.get("share") is None else ShareSpec(**data["share"])
        return cls(str(data["dataset"]), share, int(data["index"]), int(data["hospitals"]))

    def describe(self) -> str:
        if self.share is None:
            return self.dataset
        return f"{self.share.dataset}, simulated hospital {self.index} of {self.hospitals}"
