"""Present a volume to the model as radiological slices, and map arrays and voxel indices back exactly.

Only axis permutations and flips are used (no resampling), so :meth:`SliceView.from_view` is the exact inverse
of :meth:`SliceView.to_view` and a voxel index maps to exactly one view voxel. View arrays are D x H x W
(slice, row, column); the nibabel axis codes below say which way each view axis runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

__all__ = ["PLANES", "SliceView"]

PLANES: dict[str, tuple[str, str, str]] = {
    # slices inferior->superior; rows anterior->posterior; columns patient right->left (radiological view)
    "axial": ("S", "P", "L"),
    # slices anterior->posterior; rows superior->inferior; columns patient right->left
    "coronal": ("P", "I", "L"),
    # slices right->left; rows superior->inferior; columns anterior->posterior
    "sagittal": ("L", "I", "P"),
}


@dataclass(frozen=True)
class SliceView:
    """How a source array (I x J x K voxel order of the file) becomes the model's D x H x W view."""

    to_view_ornt: np.ndarray  # nibabel orientation: source axis -> (view axis, flip)
    source_shape: tuple[int, ...]
    plane: str

    @classmethod
    def for_volume(cls, volume: object, plane: str = "axial") -> SliceView:
        """The view of an :class:`~scripts.image_io.ImageVolume`; 2D pictures get a single-slice view as stored."""
        if plane not in PLANES:
            raise ValueError(f"Unknown plane {plane!r}; choose one of {sorted(PLANES)}")
        shape = tuple(int(s) for s in volume.array.shape)
        if volume.is_2d:
            return cls(to_view_ornt=np.array([[1.0, 1.0], [2.0, 1.0]]), source_shape=shape[:2], plane="2d")
        ornt = ornt_transform(io_orientation(volume.affine_ras), axcodes2ornt(PLANES[plane]))
        return cls(to_view_ornt=ornt, source_shape=shape[:3], plane=plane)

    @property
    def is_2d(self) -> bool:
        return self.plane == "2d"

    @property
    def view_shape(self) -> tuple[int, int, int]:
        if self.is_2d:
            return (1, *self.source_shape)
        shape = [0, 0, 0]
        for axis, (target, _) in enumerate(self.to_view_ornt):
            shape[int(target)] = self.source_shape[axis]
        return tuple(shape)

    def to_view(self, array: np.ndarray) -> np.ndarray:
        """Source array (spatial axes first, optional trailing channels) -> D x H x W (x channels)."""
        if self.is_2d:
            return np.asarray(array)[None]
        return apply_orientation(array, self.to_view_ornt)

    def from_view(self, array: np.ndarray) -> np.ndarray:
        """Exact inverse of :meth:`to_view`."""
        if self.is_2d:
            return np.asarray(array)[0]
        return np.ascontiguousarray(apply_orientation(array, self._inverse_ornt()))

    def points_to_view(self, points: np.ndarray) -> np.ndarray:
        """N x 3 source voxel indices (i, j, k) -> N x 3 view indices (slice, row, column).

        For 2D pictures, points are N x 3 as (0, row, column) already and pass through.
        """
        points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
        if self.is_2d:
            return points.copy()
        self._check_inside(points)
        out = np.zeros_like(points)
        for axis, (target, flip) in enumerate(self.to_view_ornt):
            coord = points[:, axis]
            out[:, int(target)] = self.source_shape[axis] - 1 - coord if flip < 0 else coord
        return out

    def boxes_to_view(self, boxes: np.ndarray) -> np.ndarray:
        """M x 6 inclusive source boxes [i0, j0, k0, i1, j1, k1] -> view boxes [d0, h0, w0, d1, h1, w1]."""
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 6)
        low, high = self.points_to_view(boxes[:, :3]), self.points_to_view(boxes[:, 3:])
        return np.concatenate([np.minimum(low, high), np.maximum(low, high)], axis=1)

    def _check_inside(self, points: np.ndarray) -> None:
        upper = np.asarray(self.source_shape)
        for point in points:
            if (point < 0).any() or (point >= upper).any():
                raise ValueError(f"Point {point.tolist()} is outside the image (shape {self.source_shape})")

    def _inverse_ornt(self) -> np.ndarray:
        """View axis -> (source axis, flip): the same flips, read the other way."""
        inverse = np.zeros((3, 2))
        for axis, (target, flip) in enumerate(self.to_view_ornt):
            inverse[int(target)] = [axis, flip]
        return inverse

