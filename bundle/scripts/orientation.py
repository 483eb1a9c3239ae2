"""Present a volume to the model as radiological slices, and map arrays and voxel indices back exactly.

The model segments 2D slices. Whatever a file's axis order and direction, its array is shown as a D x H x W
stack (slice, row, column) in a fixed anatomical orientation, using only axis permutations and flips chosen
from the voxel-to-RAS affine (no resampling), so :meth:`SliceView.from_view` is the exact inverse of
:meth:`SliceView.to_view` and every voxel index maps to exactly one view index. The nibabel axis codes in
:data:`PLANES` name the direction each view axis increases towards. 2D pictures get a single-slice view
(1, H, W) of the picture as stored; their points are (0, row, column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from .image_io import ImageVolume

__all__ = ["PLANES", "SliceView"]

PLANES: dict[str, tuple[str, str, str]] = {
    # slices inferior->superior; rows anterior->posterior; columns patient right->left (radiological view)
    "axial": ("S", "P", "L"),
    # slices anterior->posterior; rows superior->inferior; columns patient right->left
    "coronal": ("P", "I", "L"),
    # slices patient right->left; rows superior->inferior; columns anterior->posterior
    "sagittal": ("L", "I", "P"),
}
_IDENTITY = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
_PICTURE_TO_VIEW = np.eye(4)[[1, 2, 0, 3]]  # view index (0, row, column) -> picture index (row, column, 0)


@dataclass(frozen=True, eq=False)
class SliceView:
    """How a source array becomes the model's D x H x W view, and back.

    Attributes:
        ornt_to_view: nibabel orientation, one row per source axis: [view axis, +1 or -1 for a flip].
        ornt_from_view: the inverse orientation, one row per view axis.
        view_shape: (D, H, W).
        source_shape: spatial shape of the source array: (I, J, K), or (H, W) for a picture.
        plane: "axial", "coronal", "sagittal", or "2d" for pictures.
        view_affine: 4 x 4 matrix from view index (d, h, w) to RAS millimetres.
    """

    ornt_to_view: np.ndarray
    ornt_from_view: np.ndarray
    view_shape: tuple[int, int, int]
    source_shape: tuple[int, ...]
    plane: str
    view_affine: np.ndarray

    @classmethod
    def for_volume(cls, volume: ImageVolume, plane: str = "axial") -> SliceView:
        """The ``plane`` view of a volume; a 2D picture always gets its single-slice view."""
        if plane not in PLANES:
            raise ValueError(f"Unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
        if volume.is_2d:
            shape = tuple(int(s) for s in volume.array.shape[:2])
            view_affine = volume.affine_ras @ _PICTURE_TO_VIEW
            return cls(_IDENTITY, _IDENTITY, (1, *shape), shape, "2d", view_affine)
        shape = tuple(int(s) for s in volume.array.shape[:3])
        to_view = ornt_transform(io_orientation(volume.affine_ras), axcodes2ornt(PLANES[plane]))
        from_view = _inverse(to_view)
        view_shape = tuple(shape[int(axis)] for axis in from_view[:, 0])
        view_affine = volume.affine_ras @ inv_ornt_aff(to_view, shape)
        return cls(to_view, from_view, view_shape, shape, plane, view_affine)

    @property
    def is_2d(self) -> bool:
        return self.plane == "2d"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres per view axis (d, h, w); a picture's single slice counts as 1 mm thick."""
        return tuple(float(s) for s in np.linalg.norm(self.view_affine[:3, :3], axis=0))

    def to_view(self, array: np.ndarray) -> np.ndarray:
        """Source array (spatial axes first, then optional channels) -> contiguous D x H x W (x channels)."""
        array = np.asarray(array)
        self._check_shape(array, self.source_shape, "source")
        if self.is_2d:
            return np.ascontiguousarray(array[None])
        return np.ascontiguousarray(apply_orientation(array, self.ornt_to_view))

    def from_view(self, array: np.ndarray) -> np.ndarray:
        """View array D x H x W (x channels) -> contiguous source array: the exact inverse of :meth:`to_view`."""
        array = np.asarray(array)
        self._check_shape(array, self.view_shape, "view")
        if self.is_2d:
            return np.ascontiguousarray(array[0])
        return np.ascontiguousarray(apply_orientation(array, self.ornt_from_view))

    def points_to_view(self, points: np.ndarray) -> np.ndarray:
        """N x 3 integer source voxel indices (i, j, k) -> N x 3 view indices (d, h, w)."""
        points = _as_points(points, "points")
        self._check_inside(points, self._grid_shape(), "the image", self.source_shape)
        return _reorient(points, self.ornt_to_view, self._grid_shape())

    def boxes_to_view(self, boxes: np.ndarray) -> np.ndarray:
        """M x 6 inclusive source boxes [i0, j0, k0, i1, j1, k1] -> view boxes [d0, h0, w0, d1, h1, w1], low first."""
        boxes = np.asarray(boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 6:
            raise ValueError(f"boxes must be M x 6 [i0, j0, k0, i1, j1, k1], got shape {boxes.shape}")
        low, high = self.points_to_view(boxes[:, :3]), self.points_to_view(boxes[:, 3:])
        return np.concatenate([np.minimum(low, high), np.maximum(low, high)], axis=1)

    def _grid_shape(self) -> tuple[int, int, int]:
        """The source as a 3D grid: pictures are one slice of rows x columns."""
        return (1, *self.source_shape) if self.is_2d else self.source_shape

    @staticmethod
    def _check_shape(array: np.ndarray, expected: tuple[int, ...], kind: str) -> None:
        if array.shape[: len(expected)] != tuple(expected):
            raise ValueError(f"Array of shape {array.shape} does not fit the {kind} shape {tuple(expected)}")

    @staticmethod
    def _check_inside(points: np.ndarray, grid: tuple[int, ...], where: str, shown: tuple[int, ...]) -> None:
        outside = ((points < 0) | (points >= np.asarray(grid))).any(axis=1)
        if outside.any():
            point = points[np.argmax(outside)].tolist()
            raise ValueError(f"Point {point} is outside {where} (shape {tuple(shown)})")


def _inverse(ornt: np.ndarray) -> np.ndarray:
    """The orientation that undoes ``ornt``: view axis -> (source axis, same flip)."""
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = [axis, flip]
    return inverse


def _reorient(points: np.ndarray, ornt: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Move N x 3 indices of an array of ``shape`` to where :func:`apply_orientation` with ``ornt`` puts them."""
    out = np.empty_like(points)
    for axis, (target, flip) in enumerate(ornt):
        coord = points[:, axis]
        out[:, int(target)] = coord if flip > 0 else shape[axis] - 1 - coord
    return out


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{name} must be N x 3 integer voxel indices, got shape {array.shape}")
    if array.dtype.kind == "f" and not (array == np.round(array)).all():
        raise ValueError(f"{name} must be integer voxel indices, got {array.tolist()}")
    return array.astype(np.int64)
