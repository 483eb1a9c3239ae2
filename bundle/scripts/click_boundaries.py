"""Clicks that redraw boundaries: a random walker on the image re-decides the voxels near each click.

Choosing among the detector's instances (:mod:`scripts.click_selection`) only picks masks the model already drew, and
an untrained tracker cannot draw new ones: a click beside a misplaced boundary then changes its own voxel and
nothing else. Here every voxel within ``radius_mm`` of a click is decided again by Grady's random walker
(scikit-image) on the image intensities, seeded by the clicks and, at the edge of that neighbourhood, by the current
result: the boundary near a click moves to where the image changes. Voxels farther from every click keep the
result, so a click never reaches slices away from it. Each group of touching neighbourhoods is solved in its own
bounding box, and nothing outside the clicks' own bounding box is looked at, so the cost follows the clicks, not
the image size.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from skimage.segmentation import random_walker

__all__ = ["redraw_near_clicks"]

_BETA = 130.0  # scikit-image's default edge sharpness, for intensities scaled to unit spread in each box


def redraw_near_clicks(
    image: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, ...],
    radius_mm: float,
) -> np.ndarray:
    """``mask`` with the voxels within ``radius_mm`` of any click re-decided from ``image``.

    Args:
        image: D x H x W intensities (a picture is one slice).
        mask: D x H x W bool, the result to correct.
        points: N x 3 voxel indices (d, h, w); labels: N, 1 foreground, 0 background.
        spacing: millimetres per axis, which also weights the walker's steps.
        radius_mm: how far from a click a voxel may change; 0 returns ``mask`` as it is.
    """
    if radius_mm <= 0 or not len(points):
        return mask
    spacing, points = np.asarray(spacing, dtype=np.float64), np.asarray(points)
    # Only the clicks' bounding box, widened by the radius and a voxel, is looked at: the cost follows the clicks.
    reach = np.floor(radius_mm / spacing).astype(int) + 1
    low = np.maximum(points.min(axis=0) - reach, 0)
    crop = tuple(slice(a, b) for a, b in zip(low, np.minimum(points.max(axis=0) + reach + 1, mask.shape), strict=True))
    result = mask.copy()
    result[crop] = _redraw(image[crop], mask[crop], points - low, np.asarray(labels) == 1, spacing, radius_mm)
    return result


def _redraw(
    image: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    is_foreground: np.ndarray,
    spacing: np.ndarray,
    radius_mm: float,
) -> np.ndarray:
    """:func:`redraw_near_clicks` inside the clicks' bounding box (``points`` in its coordinates)."""
    near = np.zeros(mask.shape, dtype=bool)
    for point in points:
        box, inside = _ball(mask.shape, point, radius_mm, spacing)
        near[box] |= inside
    result = mask.copy()
    result[tuple(points.T)] = is_foreground
    groups, _ = ndimage.label(near, structure=np.ones((3, 3, 3)))
    for group, box in enumerate(ndimage.find_objects(groups), start=1):
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, mask.shape, strict=True))
        inner = mask[box]
        seeds = np.where(inner, 1, 2).astype(np.int32)
        # The result's own boundary is what may be wrong: within half the radius of it the image decides, so
        # seeds copied from a misplaced boundary do not pin it at the edge of the neighbourhood.
        depth = np.inf  # no boundary in the box
        if inner.any() and not inner.all():
            depth = np.maximum(*(ndimage.distance_transform_edt(m, sampling=spacing) for m in (inner, ~inner)))
        own = groups[box] == group  # another group's voxels may reach the box: they stay seeded, and unwritten
        seeds[own | (depth <= radius_mm / 2)] = 0
        local = points - [s.start for s in box]
        held = ((local >= 0) & (local < seeds.shape)).all(axis=1)
        seeds[tuple(local[held].T)] = np.where(is_foreground[held], 1, 2)
        if not (seeds == 1).any() or not (seeds == 2).any():
            continue  # one side only: nothing for the walker to weigh
        values = image[box].astype(np.float32)
        if np.ptp(values) == 0:
            continue  # a flat image (padding, air) shows no boundary to move to
        values = (values - np.median(values)) / values.std()
        with warnings.catch_warnings():  # the iterative solver's probabilities stray a little outside [0, 1]
            warnings.filterwarnings("ignore", message="The probability range is outside", category=UserWarning)
            walked = random_walker(values, seeds, beta=_BETA, mode="cg_j", tol=1e-3, spacing=spacing / spacing.min())
        redrawn = own & (seeds == 0)
        result[box][redrawn] = walked[redrawn] == 1
    return result


def _ball(
    shape: tuple[int, ...], centre: np.ndarray, radius_mm: float, spacing: np.ndarray
) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding box of the voxels within ``radius_mm`` of ``centre``, and which of its voxels they are."""
    reach = np.floor(radius_mm / spacing).astype(int)
    low = np.maximum(np.asarray(centre) - reach, 0)
    high = np.minimum(np.asarray(centre) + reach + 1, shape)
    grid = np.ogrid[tuple(slice(a, b) for a, b in zip(low, high, strict=True))]
    inside = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True)) <= radius_mm**2
    return tuple(slice(a, b) for a, b in zip(low, high, strict=True)), inside
