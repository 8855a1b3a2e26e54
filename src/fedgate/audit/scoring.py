"""Scores of a reconstruction a DPO can read: PSNR, SSIM and the re-identification rank.

PSNR alone misleads both ways (measured on Br35H: a clearly recognisable reconstruction at
17.8 dB, the dataset-mean image at 12.7 dB, a 1-px blur of the true image at 22.8 dB). What
matters is whether the reconstruction *picks out the patient*: the true image's rank among
the hospital's own images, compared with the rank the same attack reaches with no
information at all (the null run).

Ranking is by correlation, not SSIM: gradient inversion through a normalisation layer
(the zoo uses GroupNorm) recovers the layout of the image (head outline, tumour position
and size) but neither its gain and offset nor clean pixels. The match score is Pearson's
correlation of the two images after a Gaussian blur (sigma 2 px) of both: correlation
ignores gain and offset, the blur averages away the reconstruction's pixel noise, which
SSIM's local windows would score. Measured on Br35H, 3,000 candidates, reconstructions from
300-1,000 steps on the raw update (15 reconstructions of 4 images): the two scans with a
tumour ranked 1 in all 7 runs by this score (plain correlation 2-5, SSIM 1-263); of the
two without, one ranked 1, the other 5-100 over 7 runs (plain correlation 53-406); the
null runs and random smooth images ranked 297 or worse by every score."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

DATA_RANGE = 255.0
# scikit-image's default uniform 7x7 window; it refuses images smaller than 7 px.
WIN_SIZE = 7
# Gaussian blur (px) of both images before they are correlated: it averages away the
# reconstruction's pixel noise and keeps layout and structure (measured: see the module doc).
BLUR_SIGMA = 2.0
REIDENTIFIED = "re-identifiable"
NOT_DISTINGUISHABLE = "not-distinguishable"


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of uint8 images; inf for identical images."""
    if np.array_equal(reference, reconstruction):
        return math.inf
    return float(peak_signal_noise_ratio(reference, reconstruction, data_range=DATA_RANGE))  # type: ignore[no-untyped-call]


def ssim(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean SSIM (scikit-image, 7x7 window, data range 255); 1.0 for identical images."""
    value = structural_similarity(  # type: ignore[no-untyped-call]
        reference.astype(np.float64), reconstruction.astype(np.float64), data_range=DATA_RANGE, win_size=WIN_SIZE
    )
    return float(value)


def _centred_unit_rows(images: np.ndarray) -> np.ndarray:
    """Each image as a pixel vector with its mean removed, scaled to unit length (flat: 0)."""
    rows = images.reshape(len(images), -1).astype(np.float64)
    rows -= rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0))


def match_scores(candidates: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """How well each reconstruction (m, h, w) or (h, w) matches each candidate (n, h, w):
    (m, n) or (n,) correlations of the images blurred by BLUR_SIGMA. A flat image scores 0
    against everything."""
    probes = reconstructions if reconstructions.ndim == 3 else reconstructions[None]
    scores = np.asarray(_centred_unit_rows(_blurred(probes)) @ _centred_unit_rows(_blurred(candidates)).T)
    return scores if reconstructions.ndim == 3 else np.asarray(scores[0])


def _blurred(images: np.ndarray) -> np.ndarray:
    return np.asarray(gaussian_filter(images.astype(np.float64), BLUR_SIGMA, axes=(-2, -1)))


def reidentification_ranks(candidates: np.ndarray, target_index: int, reconstructions: np.ndarray) -> list[int]:
    """For each reconstruction (m, h, w): the rank (1 = best) of candidates[target_index]
    among all candidates sorted by `match_scores`. Ties are broken at random, i.e. the true
    image takes the middle of its tie (a flat guess that ties with everything ranks about
    n / 2, as a blind guess should)."""
    ranks = []
    for scores in match_scores(candidates, reconstructions):
        target = scores[target_index]
        greater = int(np.sum(scores > target))
        ties = int(np.sum(scores == target)) - 1
        ranks.append(1 + greater + ties // 2)
    return ranks


def reidentification_rank(candidates: np.ndarray, target_index: int, reconstruction: np.ndarray) -> int:
    """`reidentification_ranks` for one reconstruction (h, w)."""
    return reidentification_ranks(candidates, target_index, reconstruction[None])[0]


def rank_threshold(n_candidates: int) -> int:
    """The rank at or below which the true image counts as picked out: the top 1 % (at least 1)."""
    return max(1, n_candidates // 100)


def verdict(rank: int, null_ranks: list[int], n_candidates: int) -> str:
    """`re-identifiable` when the true image is in the top 1 % of the hospital's images
    (`rank_threshold`) *and* ranks strictly better than every null run; otherwise
    `not-distinguishable` (from a blind guess).

    Why both: the top-1 % rule says the reconstruction singles the patient out; the null
    comparison says it is the update, not the image being generic, that does it (some
    images rank high against any smooth blob: the prototype's no-information run put the
    true image at 84 of 3,000). A no-information run lands in the top 1 % about 1 % of
    the time, and must also beat every null."""
    if not null_ranks:
        raise ValueError("the verdict needs at least one null run")
    if rank <= rank_threshold(n_candidates) and rank < min(null_ranks):
        return REIDENTIFIED
    return NOT_DISTINGUISHABLE
