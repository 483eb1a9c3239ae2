"""Simulated corrective clicks: the deepest point of the largest error, with the right sign."""

from __future__ import annotations

import numpy as np

from scripts.clicks import next_click


def test_first_click_is_the_deepest_point_of_the_structure() -> None:
    reference = np.zeros((20, 20, 9), dtype=bool)
    reference[2:13, 4:15, 1:8] = True
    point, label = next_click(np.zeros_like(reference), reference, spacing=(1.0, 1.0, 1.0))
    assert label == 1 and point.tolist() == [7, 9, 4]


def test_largest_error_decides_the_sign() -> None:
    reference = np.zeros((30, 30), dtype=bool)
    reference[5:10, 5:10] = True  # 25 pixels missed
    prediction = np.zeros_like(reference)
    prediction[15:25, 15:25] = True  # 100 pixels too many
    point, label = next_click(prediction, reference, spacing=(1.0, 1.0))
    assert label == 0 and prediction[tuple(point)] and not reference[tuple(point)]
    assert next_click(reference, reference, spacing=(1.0, 1.0)) is None


def test_depth_is_measured_in_millimetres() -> None:
    reference = np.zeros((40, 40), dtype=bool)
    reference[5:15, 5:35] = True  # 10 x 30 voxels
    # With 4 mm rows the region is 40 mm tall and 30 mm wide: the deepest point is still its centre.
    point, _ = next_click(np.zeros_like(reference), reference, spacing=(4.0, 1.0))
    assert 9 <= point[0] <= 10 and 15 <= point[1] <= 24
