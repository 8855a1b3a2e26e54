"""The hospital's data: `loaders` (Br35H, MedMNIST .npz, DICOM, image folders), `partition`
(held-out test split, IID / Dirichlet shares) and `hospital` (one hospital's share)."""

from fedgate.data.hospital import HospitalData, ShareSpec, global_test_dataset, hospital_dataset, split_shares
from fedgate.data.loaders import DataError, ImageSet, load_dataset

__all__ = [
    "DataError",
    "HospitalData",
    "ImageSet",
    "ShareSpec",
    "global_test_dataset",
    "hospital_dataset",
    "load_dataset",
    "split_shares",
]
