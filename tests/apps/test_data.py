from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedgate.data.loaders import (
    MEDMNIST_MD5,
    DataError,
    load_br35h,
    load_dataset,
    load_dicom_folder,
    load_image_folder,
    load_medmnist_npz,
)


def write_medmnist(path: Path, n: int = 12, side: int = 28, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", n // 2), ("test", n // 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(count, side, side), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(count, 1), dtype=np.uint8)
    np.savez(path, **arrays)


def test_medmnist_npz_with_exact_keys_loads_each_split_resized(tmp_path: Path) -> None:
    path = tmp_path / "tiny.npz"
    write_medmnist(path)
    train = load_medmnist_npz(path, "train", size=32)
    val = load_medmnist_npz(path, "val", size=32)
    assert train.images.shape == (12, 32, 32) and train.images.dtype == np.uint8
    assert val.images.shape == (6, 32, 32)
    assert train.labels.dtype == np.int64 and set(train.labels) <= {0, 1}
    pooled = load_dataset(f"npz:{path}", size=32)
    assert len(pooled) == 24


def test_medmnist_colour_images_become_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "colour.npz"
    rng = np.random.default_rng(1)
    np.savez(path, train_images=rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8), train_labels=np.zeros((4, 1)))
    assert load_medmnist_npz(path, "train", size=28).images.shape == (4, 28, 28)


def test_missing_npz_says_nothing_is_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_medmnist_npz(tmp_path / "nope.npz")


def test_corrupt_npz_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_medmnist_npz(path)


def test_npz_without_the_split_keys_names_them(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(DataError, match="train_images"):
        load_medmnist_npz(path)


def test_official_name_with_wrong_md5_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pneumoniamnist.npz"
    write_medmnist(path)
    with pytest.raises(DataError, match="MD5"):
        load_medmnist_npz(path)


def test_official_md5_table_holds_md5_hex_digests() -> None:
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in MEDMNIST_MD5.values())
    assert MEDMNIST_MD5["pneumoniamnist.npz"] == "28209eda62fecd6e6a2d98b1501bb15f"


def _pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    assert found is not None, f"pydicom ships {name}"
    return Path(str(found))


def test_dicom_folder_reads_bundled_ct_and_mr(tmp_path: Path) -> None:
    for cls, name in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        (tmp_path / cls).mkdir()
        shutil.copy(_pydicom_file(name), tmp_path / cls / name)
        (tmp_path / cls / "README.txt").write_text("not a DICOM file; skipped")
    data = load_dicom_folder(tmp_path, size=32)
    assert data.images.shape == (2, 32, 32)
    assert data.class_names == ("ct", "mr")
    assert list(data.labels) == [0, 1]
    assert data.images[0].std() > 0  # real pixels, not a blank frame


def test_empty_dicom_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="one sub-folder"):
        load_dicom_folder(tmp_path)
    (tmp_path / "tumour").mkdir()
    (tmp_path / "tumour" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="no readable DICOM"):
        load_dicom_folder(tmp_path)


def test_image_folder_per_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for cls in ("no", "yes"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_image_folder(tmp_path, size=16)
    assert data.images.shape == (6, 16, 16)
    assert list(data.labels) == [0, 0, 0, 1, 1, 1]


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "b" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"bad\.png"):
        load_image_folder(tmp_path)


def test_br35h_has_3000_balanced_images_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGATE_CACHE", str(tmp_path))
    first = load_br35h(32)
    assert first.images.shape == (3000, 32, 32)
    assert np.bincount(first.labels).tolist() == [1500, 1500]
    cached = tmp_path / "br35h-32.npz"
    assert cached.is_file()
    again = load_br35h(32)
    assert hashlib.sha256(again.images.tobytes()).digest() == hashlib.sha256(first.images.tobytes()).digest()


def test_unknown_dataset_spec_lists_the_choices() -> None:
    with pytest.raises(DataError, match=r"br35h, npz:PATH"):
        load_dataset("imagenet")


class CountedOpen:
    """PIL's Image.open as the loaders call it, counting the files decoded."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self._open = Image.open

    def __call__(self, path: Path, *args: object, **kwargs: object) -> Image.Image:
        self.opened.append(Path(path).name)
        return self._open(path, *args, **kwargs)  # type: ignore[arg-type]


def test_each_simulated_hospital_decodes_its_share_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Br35H's 3,000 JPEGs are split on their labels first: a hospital (or the server's test
    set) decodes only its images, exactly the ones a whole-set decode would have cut out for
    it, and a second task of the same hospital reads them from its cache."""
    from fedgate.data.hospital import _dataset, _share, _split, global_test_dataset, hospital_dataset
    from fedgate.data.partition import partition

    monkeypatch.setenv("FEDGATE_CACHE", str(tmp_path / "cache"))
    for cached in (_dataset, _split, _share):
        cached.cache_clear()
    whole = load_br35h(32)  # the reference: everything decoded (kept outside the cache)
    (tmp_path / "cache" / "br35h-32.npz").unlink()
    split = partition(whole.labels, 5, "dirichlet", 0.5, 0.2, 0)
    counted = CountedOpen()
    monkeypatch.setattr("fedgate.data.loaders.Image.open", counted)
    share = hospital_dataset("br35h", 2, 5, image_size=32)
    assert len(counted.opened) == len(split.hospitals[2]) < len(whole) // 10  # the 91-image hospital's, not 3,000
    mine = whole.subset(split.hospitals[2])
    order = np.random.default_rng([0, 5, 2]).permutation(len(mine))
    n_val = max(1, len(mine) // 10)
    for ours, reference in zip(
        share, (mine.subset(np.sort(order[n_val:])), mine.subset(np.sort(order[:n_val]))), strict=True
    ):
        assert np.array_equal(ours.images, reference.images) and np.array_equal(ours.labels, reference.labels)
    counted.opened.clear()
    from fedgate.data import ShareSpec

    test = global_test_dataset(ShareSpec(image_size=32), 5)
    assert len(counted.opened) == len(split.test)
    assert np.array_equal(test.images, whole.subset(split.test).images)
    counted.opened.clear()
    _share.cache_clear()  # the next round's task is a new process: it reads its share from the cache
    hospital_dataset("br35h", 2, 5, image_size=32)
    assert counted.opened == []
