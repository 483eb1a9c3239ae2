"""Simulated corrective clicks (SAM-Med3D / nnInteractive protocol) and the interactive evaluation.

The next click goes to the voxel deepest inside the largest error region: a foreground click where the model
missed the structure, a background click where it over-segmented. Depth is measured in millimetres, so
anisotropic volumes are handled.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .image_io import read_image
from .inference import VolumeSegmenter
from .metrics import dice
from .prompts import PromptSet

__all__ = ["next_click", "run_interactive_evaluation"]

logger = logging.getLogger(__name__)


def next_click(
    prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, int] | None:
    """``(voxel index, label)`` of the next corrective click (1 foreground, 0 background); None if perfect."""
    prediction, reference = prediction.astype(bool), reference.astype(bool)
    best: tuple[float, np.ndarray, int] | None = None
    for error, label in ((reference & ~prediction, 1), (prediction & ~reference, 0)):
        regions, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = ndimage.sum_labels(error, regions, index=range(1, count + 1))
        largest = regions == (int(np.argmax(sizes)) + 1)
        # Pad so the image border counts as outside the region: the click lands in its interior.
        depth = ndimage.distance_transform_edt(np.pad(largest, 1), sampling=list(spacing))[
            (slice(1, -1),) * largest.ndim
        ]
        point = _centre_of_deepest(depth, spacing)
        size = float(sizes.max())
        if best is None or size > best[0]:
            best = (size, point, label)
    return None if best is None else (best[1], best[2])


def _centre_of_deepest(depth: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Among the deepest voxels (often a plateau), the one nearest their centroid, in millimetres."""
    candidates = np.argwhere(depth >= depth.max() - 1e-6)
    scaled = candidates * np.asarray(spacing)
    nearest = np.argmin(((scaled - scaled.mean(axis=0)) ** 2).sum(axis=1))
    return candidates[nearest]


def run_interactive_evaluation(
    segmenter: VolumeSegmenter,
    items: Sequence[dict[str, Any]],
    labels: dict[int, str],
    output_dir: str | Path,
    clicks: Sequence[int] = (1, 3, 5),
) -> list[dict[str, Any]]:
    """Dice after each number of simulated clicks, per case and label; writes ``interactive.csv`` and a plot.

    The first click is the deepest point of the structure; each later click corrects the largest error of the
    previous result. Clicks are given with the label's text prompt, as a user refining a named structure.
    """
    if not clicks or min(clicks) < 1:
        raise ValueError(f"clicks must be positive counts, got {list(clicks)}")
    rows = []
    for item in items:
        volume, reference = read_image(item["image"]), read_image(item["label"]).array
        for value, name in labels.items():
            target = reference == value
            if not target.any():
                logger.info("%s has no %s: skipped in the interactive evaluation", item["image"], name)
                continue
            points: list[np.ndarray] = []
            point_labels: list[int] = []
            prediction = np.zeros_like(target)
            for count in range(1, max(clicks) + 1):
                click = next_click(prediction, target, volume.spacing)
                if click is None:  # already perfect: later counts keep the result
                    rows += [_row(item, value, name, later, 1.0) for later in clicks if later >= count]
                    break
                points.append(click[0])
                point_labels.append(click[1])
                prompts = PromptSet.create(texts=[name], points=np.array(points), point_labels=point_labels)
                prediction = segmenter.segment(volume, prompts).label > 0
                if count in clicks:
                    rows.append(
                        {
                            "image": item["image"],
                            "label": value,
                            "name": name,
                            "clicks": count,
                            "dice": dice(prediction, target),
                        }
                    )
    _write(rows, Path(output_dir), clicks)
    return rows


def _row(item: dict[str, Any], value: int, name: str, clicks: int, score: float) -> dict[str, Any]:
    return {"image": item["image"], "label": value, "name": name, "clicks": clicks, "dice": score}


def _write(rows: list[dict[str, Any]], output_dir: Path, clicks: Sequence[int]) -> None:
    if not rows:
        raise ValueError("No case had any of the evaluated labels: nothing to evaluate")
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "interactive.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for name in dict.fromkeys(row["name"] for row in rows):
        means = [
            np.mean([r["dice"] for r in rows if r["name"] == name and r["clicks"] == c] or [np.nan]) for c in clicks
        ]
        axis.plot(list(clicks), means, marker="o", label=name)
    axis.set(xlabel="simulated clicks", ylabel="mean Dice", ylim=(0, 1), title="Medical SAM3: Dice against clicks")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "interactive_dice.png", dpi=100)
    plt.close(figure)
