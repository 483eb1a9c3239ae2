"""Dice and NSD on analytic cases, the empty-mask conventions, per-label rows, CSV output and summaries."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scripts.metrics import dice, evaluate_label_maps, summarise, surface_dice, write_metrics_csv


def _box(shape: tuple[int, ...], start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))] = True
    return mask


def _sphere(shape: tuple[int, int, int], centre: tuple[float, ...], radius_mm: float, spacing: tuple[float, ...]):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    centre_mm = [c * s for c, s in zip(centre, spacing, strict=True)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= radius_mm**2


@pytest.mark.parametrize("shape", [(20, 24), (12, 14, 16)])
def test_identical_masks_score_one(shape: tuple[int, ...]) -> None:
    mask = _box(shape, (2,) * len(shape), (9,) * len(shape))
    assert dice(mask, mask) == 1.0
    assert surface_dice(mask, mask, (1.0,) * len(shape), tolerance_mm=0.0) == 1.0


def test_disjoint_masks_score_zero() -> None:
    a, b = _box((30, 30), (0, 0), (5, 5)), _box((30, 30), (20, 20), (25, 25))
    assert dice(a, b) == 0.0
    assert surface_dice(a, b, (1.0, 1.0), tolerance_mm=2.0) == 0.0


def test_dice_of_overlapping_boxes() -> None:
    a = _box((20, 20), (0, 0), (10, 10))
    assert dice(a, _box((20, 20), (0, 5), (10, 15))) == pytest.approx(0.5)  # 2 * 50 / (100 + 100)
    assert dice(a, _box((20, 20), (0, 0), (10, 5))) == pytest.approx(2 / 3)  # 2 * 50 / (100 + 50)
    cube = _box((8, 8, 8), (0, 0, 0), (4, 4, 4))
    assert dice(cube, _box((8, 8, 8), (0, 0, 2), (4, 4, 6))) == pytest.approx(0.5)  # 2 * 32 / (64 + 64)


def test_non_zero_values_are_foreground() -> None:
    a = _box((6, 6), (1, 1), (4, 4)).astype(np.uint8) * 7
    assert dice(a, a > 0) == 1.0


def test_empty_mask_conventions() -> None:
    empty, box = np.zeros((10, 10, 10), dtype=bool), _box((10, 10, 10), (2, 2, 2), (5, 5, 5))
    assert dice(empty, empty) == 1.0 and surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert dice(box, empty) == 0.0 and surface_dice(box, empty, (1, 1, 1)) == 0.0
    assert dice(empty, box) == 0.0 and surface_dice(empty, box, (1, 1, 1)) == 0.0


def test_nsd_of_shifted_square_depends_on_tolerance() -> None:
    a, b = _box((20, 20), (5, 5), (15, 15)), _box((20, 20), (5, 6), (15, 16))  # shifted by one pixel
    assert surface_dice(a, b, (1.0, 1.0), tolerance_mm=1.0) == 1.0
    assert 0.3 < surface_dice(a, b, (1.0, 1.0), tolerance_mm=0.5) < 1.0
    assert surface_dice(a, b, (0.4, 0.4), tolerance_mm=0.5) == 1.0  # the same shift is 0.4 mm with finer pixels


def test_nsd_of_shifted_sphere_with_anisotropic_spacing() -> None:
    spacing = (3.0, 1.0, 1.0)  # thick slices along axis 0
    shape = (16, 40, 40)
    sphere = _sphere(shape, (8, 20, 20), 10.0, spacing)
    in_plane = _sphere(shape, (8, 21.5, 20), 10.0, spacing)  # 1.5 mm away: within the 2 mm tolerance
    across = _sphere(shape, (9, 20, 20), 10.0, spacing)  # one slice = 3 mm away: beyond it
    assert surface_dice(sphere, in_plane, spacing, tolerance_mm=2.0) == 1.0
    shifted = surface_dice(sphere, across, spacing, tolerance_mm=2.0)
    assert 0.5 < shifted < 1.0
    assert surface_dice(sphere, across, spacing, tolerance_mm=3.5) == 1.0
    assert surface_dice(sphere, across, (1.0, 1.0, 1.0), tolerance_mm=2.0) == 1.0  # what ignoring spacing would say


def test_mask_touching_the_border_has_a_surface_there() -> None:
    full, cut = np.ones((10, 10, 10), dtype=bool), _box((10, 10, 10), (0, 0, 0), (9, 10, 10))
    assert surface_dice(full, full, (1, 1, 1), tolerance_mm=0.0) == 1.0
    assert 0.5 < surface_dice(full, cut, (1, 1, 1), tolerance_mm=0.5) < 1.0


@pytest.mark.parametrize(
    ("pred", "ref", "kwargs", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 5)), {}, r"Prediction shape \(4, 4\) does not match reference shape \(4, 5\)"),
        (np.zeros(4), np.zeros(4), {}, r"Masks must be 2D or 3D, got shape \(4,\)"),
        (np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)), {}, r"Masks must be 2D or 3D, got shape \(2, 2, 2, 2\)"),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), {"spacing": (1, 1)}, r"spacing \(1, 1\) has 2 values for a 3D mask"),
        (np.ones((4, 4)), np.ones((4, 4)), {"spacing": (1, 0)}, r"spacing must be positive and finite, got \(1, 0\)"),
        (np.ones((4, 4)), np.ones((4, 4)), {"spacing": (1, np.nan)}, "spacing must be positive and finite"),
        (
            np.ones((4, 4)),
            np.ones((4, 4)),
            {"spacing": 1.0},
            r"spacing must be a sequence of 2 numbers \(mm per axis\)",
        ),
        (np.ones((4, 4)), np.ones((4, 4)), {"spacing": ("a", 1)}, "spacing must be a sequence of 2 numbers"),
        (np.ones((4, 4)), np.ones((4, 4)), {"tolerance_mm": -1}, "tolerance_mm must be a number >= 0, got -1"),
        (np.ones((4, 4)), np.ones((4, 4)), {"tolerance_mm": "2"}, "tolerance_mm must be a number >= 0, got '2'"),
    ],
)
def test_surface_dice_rejects_bad_input(pred: np.ndarray, ref: np.ndarray, kwargs: dict[str, Any], message: str):
    arguments = {"spacing": (1.0,) * pred.ndim, **kwargs}
    with pytest.raises(ValueError, match=message):
        surface_dice(pred, ref, **arguments)


def test_dice_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"Prediction shape \(3, 3\) does not match reference shape \(3, 3, 1\)"):
        dice(np.zeros((3, 3)), np.zeros((3, 3, 1)))


def test_evaluate_label_maps() -> None:
    ref = np.zeros((12, 12, 12), dtype=np.int64)
    ref[0:4, 0:4, 0:4], ref[6:10, 6:10, 6:10] = 1, 2
    pred = ref.copy()
    pred[6:10, 6:10, 6:8] = 0  # half of label 2 missed
    labels = {1: "liver", 2: "spleen", 3: "aorta"}
    rows = evaluate_label_maps(pred, ref, labels, spacing=(1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert [(r["label"], r["name"], r["dice"], r["nsd"]) for r in rows][0::2] == [
        (1, "liver", 1.0, 1.0),
        (3, "aorta", 1.0, 1.0),  # absent from both: nothing to find, nothing found
    ]
    assert rows[1]["dice"] == pytest.approx(2 / 3) and 0.0 < rows[1]["nsd"] < 1.0


@pytest.mark.parametrize(
    ("labels", "shape", "message"),
    [
        ({}, (4, 4), r"No labels to evaluate: give a \{value: name\} map"),
        ({0: "background"}, (4, 4), r"Label values must be integers >= 1 \(0 is background\), got 0 for 'background'"),
        ({"1": "liver"}, (4, 4), "Label values must be integers >= 1 .*, got '1' for 'liver'"),
        ({1: "liver"}, (4, 5), r"Prediction shape \(4, 4\) does not match reference shape \(4, 5\)"),
    ],
)
def test_evaluate_label_maps_rejects_bad_input(labels: dict, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_label_maps(np.zeros((4, 4)), np.zeros(shape), labels, spacing=(1.0, 1.0))


def test_write_metrics_csv(tmp_path: Path) -> None:
    rows = [
        {"image": "a.nii.gz", "label": 1, "name": "liver", "dice": 0.5, "nsd": 0.25},
        {"image": "b.nii.gz", "label": 1, "name": "liver", "dice": 1.0, "nsd": 1.0, "note": "extra"},
    ]
    path = write_metrics_csv(rows, tmp_path / "eval" / "metrics.csv")
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["image", "label", "name", "dice", "nsd", "note"]
    assert read[0]["note"] == "" and read[1]["note"] == "extra"
    assert [(r["image"], float(r["dice"]), float(r["nsd"])) for r in read] == [
        ("a.nii.gz", 0.5, 0.25),
        ("b.nii.gz", 1, 1),
    ]
    with pytest.raises(ValueError, match="No metric rows to write"):
        write_metrics_csv([], tmp_path / "empty.csv")


def test_summarise() -> None:
    rows = [
        {"label": 1, "name": "liver", "dice": 1.0, "nsd": 0.8},
        {"label": 2, "name": "spleen", "dice": 0.9, "nsd": 0.9},
        {"label": 1, "name": "liver", "dice": 0.5, "nsd": 0.6},
        {"label": 1, "name": "liver", "dice": 0.6, "nsd": 1.0},
    ]
    summary = summarise(rows)
    assert list(summary) == ["liver", "spleen"]
    liver = summary["liver"]
    assert liver["label"] == 1 and liver["cases"] == 3
    assert liver["dice_mean"] == pytest.approx(0.7) and liver["dice_median"] == pytest.approx(0.6)
    assert liver["dice_std"] == pytest.approx(math.sqrt(((0.3**2) + (0.2**2) + (0.1**2)) / 3))
    assert liver["nsd_mean"] == pytest.approx(0.8) and liver["nsd_median"] == pytest.approx(0.8)
    assert summary["spleen"] == {
        "label": 2, "cases": 1, "dice_mean": 0.9, "dice_median": 0.9, "dice_std": 0.0,
        "nsd_mean": 0.9, "nsd_median": 0.9, "nsd_std": 0.0,
    }  # fmt: skip
    assert summarise([]) == {}
