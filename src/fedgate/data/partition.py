"""Splitting one labelled set across simulated hospitals (shared by the reference app and
the hospital's own trainer, so both see exactly the same shares).

A held-out global test split is cut first (stratified, seeded) and no hospital ever trains
on it. The rest is split IID or with Dirichlet(alpha) label skew: for each class, a
Dirichlet draw decides which share of that class each hospital gets, so small alpha gives
hospitals with very different case mixes, as real ones have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    test: np.ndarray  # indices of the held-out global test split
    hospitals: tuple[np.ndarray, ...]  # indices each hospital trains on


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices; each class contributes `fraction` of its members to test."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 1])
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[: max(1, round(len(members) * fraction))])
    test_index = np.sort(np.concatenate(test))
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    return train_index, test_index


def iid(index: np.ndarray, n_hospitals: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng([seed, 2])
    return tuple(np.sort(part) for part in np.array_split(rng.permutation(index), n_hospitals))


def dirichlet(
    index: np.ndarray, labels: np.ndarray, n_hospitals: int, alpha: float, seed: int, min_size: int = 10
) -> tuple[np.ndarray, ...]:
    """Label-skewed split. Redraws (up to 100 times) until every hospital has `min_size` images,
    as a hospital with none cannot train; raises if alpha makes that impossible."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 3])
    sub_labels = labels[index]
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_hospitals)]
        for cls in np.unique(sub_labels):
            members = rng.permutation(index[sub_labels == cls])
            shares = rng.dirichlet(np.full(n_hospitals, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for hospital, chunk in enumerate(np.split(members, cuts)):
                parts[hospital].append(chunk)
        result = tuple(np.sort(np.concatenate(p)) for p in parts)
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(
        f"could not give each of {n_hospitals} hospitals {min_size} images with alpha={alpha} "
        f"from {len(index)} images: use fewer hospitals or a larger alpha"
    )


def partition(
    labels: np.ndarray,
    n_hospitals: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    if n_hospitals < 1:
        raise ValueError(f"need at least one hospital, got {n_hospitals}")
    train, test = held_out_split(labels, test_fraction, seed)
    if len(train) < n_hospitals:
        raise ValueError(f"{len(train)} training images cannot be split across {n_hospitals} hospitals")
    if scheme == "iid":
        hospitals = iid(train, n_hospitals, seed)
    elif scheme == "dirichlet":
        hospitals = dirichlet(train, labels, n_hospitals, alpha, seed, min_size=min(10, len(train) // n_hospitals))
    else:
        raise ValueError(f"partition scheme must be 'iid' or 'dirichlet', got {scheme!r}")
    return Split(test=test, hospitals=hospitals)
