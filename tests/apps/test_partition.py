from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.data.partition import partition

labels_strategy = st.lists(st.integers(0, 2), min_size=60, max_size=300).map(lambda xs: np.asarray(xs, dtype=np.int64))


@settings(max_examples=40, deadline=None)
@given(
    labels=labels_strategy,
    n=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    scheme=st.sampled_from(["iid", "dirichlet"]),
)
def test_partition_is_disjoint_complete_and_holds_out_test(labels: np.ndarray, n: int, seed: int, scheme: str) -> None:
    try:
        split = partition(labels, n, scheme=scheme, alpha=1.0, test_fraction=0.2, seed=seed)
    except ValueError as err:  # dirichlet may be unable to give everyone enough images
        assert "could not give" in str(err)
        return
    parts = [*split.hospitals, split.test]
    combined = np.concatenate(parts)
    assert len(combined) == len(set(combined.tolist())), "a sample is in two places"
    assert sorted(combined.tolist()) == list(range(len(labels))), "a sample was lost"
    assert len(split.hospitals) == n
    train = set(np.concatenate(split.hospitals).tolist())
    assert not train & set(split.test.tolist()), "a hospital trains on the global test split"


def test_partition_is_seeded() -> None:
    labels = np.random.default_rng(0).integers(0, 2, 500)
    a = partition(labels, 4, seed=3)
    b = partition(labels, 4, seed=3)
    c = partition(labels, 4, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.hospitals, b.hospitals, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.hospitals, c.hospitals, strict=True))


def test_small_alpha_gives_label_skew_and_large_alpha_balance() -> None:
    labels = np.repeat([0, 1], 1000)

    def skew(alpha: float) -> float:
        split = partition(labels, 5, scheme="dirichlet", alpha=alpha, seed=1)
        fractions = [labels[h].mean() for h in split.hospitals]
        return float(np.std(fractions))

    assert skew(0.1) > 0.2 > 0.05 > skew(100.0)


def test_test_split_is_stratified() -> None:
    labels = np.repeat([0, 1], [300, 100])
    split = partition(labels, 2, scheme="iid", test_fraction=0.25, seed=0)
    assert np.bincount(labels[split.test]).tolist() == [75, 25]


@pytest.mark.parametrize("bad", [{"n_hospitals": 0}, {"scheme": "round-robin"}, {"alpha": 0.0}, {"test_fraction": 1.0}])
def test_bad_partition_settings_are_clear_errors(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"n_hospitals": 2, "scheme": "dirichlet", "alpha": 0.5, "test_fraction": 0.2, **bad}
    with pytest.raises(ValueError):
        partition(np.repeat([0, 1], 50), **args)  # type: ignore[arg-type]
