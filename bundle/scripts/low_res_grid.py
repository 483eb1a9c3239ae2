"""Slice pixels and the predictor's low-resolution mask grid (``low x low`` cells covering an H x W slice).

Masks are predicted on that grid and upsampled only when the label map is assembled, so prompts that act on masks
(a box window, a click choosing an instance) are mapped onto the grid first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["box_window", "pixel_cells"]


def pixel_cells(points: np.ndarray, height: int, width: int, low: int) -> np.ndarray:
    """N x 3 view voxels (slice, row, column) -> the low-resolution cells their pixel centres fall in."""
    points = np.asarray(points, dtype=np.int64)
    rows = np.floor((points[:, 1] + 0.5) * low / height).astype(np.int64)
    cols = np.floor((points[:, 2] + 0.5) * low / width).astype(np.int64)
    return np.stack([points[:, 0], rows.clip(0, low - 1), cols.clip(0, low - 1)], axis=1)


def box_window(low: int, height: int, width: int, box: Sequence[float], device: torch.device) -> torch.Tensor:
    """low x low boolean mask of the cells whose centres fall inside the (inclusive) pixel box, plus one cell."""
    r0, c0, r1, c1 = box
    rows = (torch.arange(low, device=device) + 0.5) * height / low - 0.5
    cols = (torch.arange(low, device=device) + 0.5) * width / low - 0.5
    margin_r, margin_c = height / low, width / low  # one low-res cell, for the border
    in_r = (rows >= r0 - margin_r) & (rows <= r1 + margin_r)
    in_c = (cols >= c0 - margin_c) & (cols <= c1 + margin_c)
    return in_r[:, None] & in_c[None, :]
