"""Scores on hand-made cases: identical images, gain and offset, flat guesses, the verdict's rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from audit_fixtures import one_thread, shapes  # noqa: F401  (one_thread: an autouse fixture)
from fedgate.audit.scoring import (
    NOT_DISTINGUISHABLE,
    REIDENTIFIED,
    match_scores,
    psnr,
    rank_threshold,
    reidentification_rank,
    ssim,
    verdict,
)


def test_identical_image_scores_inf_db_ssim_one_and_rank_one() -> None:
    images = shapes(40)
    assert psnr(images[5], images[5]) == math.inf
    assert ssim(images[5], images[5]) == pytest.approx(1.0)
    assert reidentification_rank(images, 5, images[5]) == 1


def test_psnr_of_a_constant_offset() -> None:
    image = shapes(1)[0]
    brighter = (image.astype(int) + 10).clip(0, 255).astype(np.uint8)
    assert np.all(image <= 245)
    assert psnr(image, brighter) == pytest.approx(20 * math.log10(255 / 10))


def test_rank_ignores_gain_and_offset_of_the_reconstruction() -> None:
    images = shapes(40)
    dimmed = (images[7] * 0.5 + 60).astype(np.uint8)
    assert reidentification_rank(images, 7, dimmed) == 1


def test_flat_guess_ties_with_everything_and_ranks_in_the_middle() -> None:
    images = shapes(41)
    flat = np.full_like(images[0], 128)
    assert np.all(match_scores(images, flat) == 0)
    assert reidentification_rank(images, 3, flat) == 21


def test_a_better_matching_decoy_pushes_the_true_image_down() -> None:
    images = shapes(40)
    assert reidentification_rank(images, 0, images[1]) > 1


def test_verdict_needs_top_one_percent_and_to_beat_every_null() -> None:
    assert rank_threshold(3000) == 30
    assert rank_threshold(64) == 1
    assert verdict(1, [500, 80], 3000) == REIDENTIFIED
    assert verdict(30, [31], 3000) == REIDENTIFIED
    assert verdict(31, [2000], 3000) == NOT_DISTINGUISHABLE  # outside the top 1 %
    assert verdict(5, [5, 900], 3000) == NOT_DISTINGUISHABLE  # a null run did as well
    assert verdict(2, [40], 64) == NOT_DISTINGUISHABLE  # 64 candidates: only rank 1 counts
    with pytest.raises(ValueError):
        verdict(1, [], 3000)
