"""Clicks that redraw the boundary near them: the random walker follows the image within the radius, and nothing
farther from every click changes. Its Dice on a trained model is tested in ``tests/test_demo_model.py``."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from scripts.click_boundaries import _redraw, redraw_near_clicks

SPACING = (2.0, 1.0, 1.0)
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _square(noise: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """A bright square prism through every slice, on a noisy background, and its true mask."""
    truth = np.zeros((9, 40, 40), dtype=bool)
    truth[:, 10:30, 10:30] = True
    image = np.where(truth, 100.0, 0.0) + np.random.default_rng(0).normal(0.0, noise, truth.shape)
    return image, truth


def _within(shape: tuple[int, ...], point: tuple[int, ...], radius_mm: float) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    distance = sum(((g - p) * s) ** 2 for g, p, s in zip(grid, point, SPACING, strict=True))
    return distance <= radius_mm**2


@pytest.mark.parametrize("off_by", [1, 2, 3])
@pytest.mark.parametrize("grow", [True, False])
def test_a_click_moves_the_boundary_to_the_image_edge_near_it(grow: bool, off_by: int) -> None:
    """A result ``off_by`` voxels too big (a background click in the spill) or too small (a foreground click in the
    miss) on every slice: near the click the boundary goes back to the image's edge, farther away nothing moves."""
    image, truth = _square()
    change = ndimage.binary_dilation if grow else ndimage.binary_erosion
    mask = change(truth, IN_PLANE, iterations=off_by)
    point, label = ((4, 10 - off_by, 20), 0) if grow else ((4, 9 + off_by, 20), 1)
    redrawn = redraw_near_clicks(image, mask, np.array([point]), np.array([label]), SPACING, radius_mm=6.0)
    near = _within(mask.shape, point, 6.0)
    assert (mask[near] != truth[near]).sum() >= 50 * off_by and (redrawn[near] != truth[near]).sum() <= 3
    np.testing.assert_array_equal(redrawn[~near], mask[~near])
    assert redrawn[point] == bool(label)


def test_clicks_far_apart_are_solved_apart_and_touching_ones_together() -> None:
    image, truth = _square()
    mask = ndimage.binary_dilation(truth, IN_PLANE, iterations=2)
    points = np.array([(2, 8, 20), (2, 20, 8), (6, 31, 20), (6, 32, 22)])
    redrawn = redraw_near_clicks(image, mask, points, np.zeros(4, dtype=int), SPACING, radius_mm=5.0)
    near = np.logical_or.reduce([_within(mask.shape, tuple(p), 5.0) for p in points])
    assert (redrawn[near] != truth[near]).sum() <= 3
    np.testing.assert_array_equal(redrawn[~near], mask[~near])


def test_nothing_to_weigh_leaves_the_result() -> None:
    image, truth = _square()
    points, labels = np.array([(4, 20, 20)]), np.array([1])
    assert redraw_near_clicks(image, truth, points, labels, SPACING, radius_mm=0.0) is truth  # radius 0: off
    # a foreground click deep inside: every seed around it is foreground, nothing can change
    np.testing.assert_array_equal(redraw_near_clicks(image, truth, points, labels, SPACING, radius_mm=4.0), truth)
    empty = np.zeros_like(truth)  # a background click with no result near it
    np.testing.assert_array_equal(redraw_near_clicks(image, empty, points, np.array([0]), SPACING, 4.0), empty)


def test_a_picture_is_one_slice() -> None:
    image, truth = _square()
    image, truth = image[:1], truth[:1]
    mask = ndimage.binary_dilation(truth[0], iterations=2)[None]
    redrawn = redraw_near_clicks(image, mask, np.array([(0, 8, 20)]), np.array([0]), (1.0, 1.0, 1.0), 6.0)
    assert redrawn[0, 8, 20] == 0 and redrawn[0, 9, 20] == 0 and redrawn[0, 11, 20] == 1


def test_a_flat_image_shows_no_boundary_to_move_to() -> None:
    """Padding or air: constant intensities give the walker nothing to weigh (it would answer NaN, read as
    foreground), so the result stays, but for the clicked voxels themselves."""
    mask = np.zeros((5, 30, 30), dtype=bool)
    mask[:, :, :15] = True
    flat = np.zeros(mask.shape, dtype=np.float32)
    for label in (0, 1):
        point = (2, 15, 13 if label == 0 else 17)
        redrawn = redraw_near_clicks(flat, mask, np.array([point]), np.array([label]), (1.0, 1.0, 1.0), 6.0)
        expected = mask.copy()
        expected[point] = bool(label)
        np.testing.assert_array_equal(redrawn, expected)


def test_each_group_is_solved_as_if_alone() -> None:
    """Two neighbourhoods that do not touch, one reaching into the other's box: each group's voxels come out as
    its clicks alone would make them, whatever the order the groups are solved in."""
    image, truth = _square()
    mask = ndimage.binary_dilation(truth, IN_PLANE, iterations=2)
    points, labels = np.array([(4, 12, 12), (4, 24, 21)]), np.array([0, 1])
    together = redraw_near_clicks(image, mask, points, labels, SPACING, 6.0)
    for i, point in enumerate(points):
        alone = redraw_near_clicks(image, mask, points[i : i + 1], labels[i : i + 1], SPACING, 6.0)
        near = _within(mask.shape, tuple(point), 6.0)
        np.testing.assert_array_equal(together[near], alone[near])


def test_only_the_clicks_bounding_box_is_solved() -> None:
    """The crop round the clicks (radius plus a voxel) gives what solving over the whole image gives, clicks at the
    image's corner included."""
    image, truth = _square()
    mask = ndimage.binary_dilation(truth, IN_PLANE, iterations=2)
    points, labels = np.array([(0, 0, 0), (4, 8, 20), (8, 33, 31)]), np.array([0, 0, 1])
    whole = _redraw(image, mask, points, labels == 1, np.asarray(SPACING), 5.0)
    np.testing.assert_array_equal(redraw_near_clicks(image, mask, points, labels, SPACING, 5.0), whole)
