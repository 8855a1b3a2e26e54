"""The reference app's loaders: re-exported from `fedgate.data.loaders`, where they live so
that the hospital's own trainer can read the same data without importing this app."""

from __future__ import annotations

from fedgate.data.loaders import (
    IMAGE_SUFFIXES,
    MEDMNIST_MD5,
    MEDMNIST_SPLITS,
    DataError,
    ImageSet,
    br35h_folder,
    cache_dir,
    load_br35h,
    load_dataset,
    load_dicom_folder,
    load_image_folder,
    load_medmnist_npz,
    to_gray_square,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MEDMNIST_MD5",
    "MEDMNIST_SPLITS",
    "DataError",
    "ImageSet",
    "br35h_folder",
    "cache_dir",
    "load_br35h",
    "load_dataset",
    "load_dicom_folder",
    "load_image_folder",
    "load_medmnist_npz",
    "to_gray_square",
]
