"""Where the next simulated corrective click goes (the SAM-Med3D / nnInteractive protocol): pure geometry.

The next click goes to the voxel deepest inside the largest error region: a foreground click where the model
missed the structure, a background click where it over-segmented. Depth is measured in millimetres, so
anisotropic volumes are handled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["next_click"]


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
