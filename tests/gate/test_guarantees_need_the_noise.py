"""The check CI runs on the guarantee tests themselves: with the gate's noise removed (every
draw replaced by zero), they must fail. A guarantee test that passes without the guarantee is
a defect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_the_guarantee_tests_fail_when_the_noise_is_removed() -> None:
    env = {**os.environ, "FEDGATE_TESTS_REMOVE_NOISE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_guarantees.py"), "-rf"],
        capture_output=True, text=True, env=env, cwd=HERE.parents[1], timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:]
    for name in (
        "test_two_identical_replies_leave_differently",
        "test_the_residual_is_gaussian_with_the_stated_sigma",
        "test_the_recorded_bound_is_the_capacity_of_the_noise_that_was_added",
    ):
        assert f"FAILED tests/gate/test_guarantees.py::{name}" in result.stdout, result.stdout[-3000:]


def test_with_the_noise_in_place_they_pass() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_guarantees.py")],
        capture_output=True, text=True, env=dict(os.environ), cwd=HERE.parents[1], timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
