"""The one prompt contract: what a request may ask, validated once, in the original image's voxel indices.

Coordinates are array indices of the image as read (:class:`scripts.image_io.ImageVolume`): ``(i, j, k)`` for
volumes, which is what 3D Slicer calls IJK, and ``(row, column)`` for 2D pictures. Boxes are inclusive corner
pairs in the same order: ``[i0, j0, k0, i1, j1, k1]`` or ``[row0, col0, row1, col1]``. The MONAI Label tasks
and the bundle's command line both build a :class:`PromptSet` and nothing else reaches the model.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PromptSet", "parse_flag", "parse_list_argument"]


@dataclass(frozen=True)
class PromptSet:
    """Text prompts (names or free text), foreground/background clicks and boxes for one image.

    Attributes:
        texts: label names, indices (as strings or ints) or free text; one output label per text.
        points: N x ndim integer voxel indices of the original image.
        point_labels: N values, 1 = foreground, 0 = background.
        boxes: M x (2 * ndim) inclusive voxel index corners.
    """

    texts: tuple[str, ...] = ()
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), dtype=np.int64))

    @classmethod
    def create(
        cls,
        texts: Sequence[str | int] | str | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        point_labels: Sequence[int] | np.ndarray | None = None,
        boxes: Sequence[Sequence[float]] | np.ndarray | None = None,
    ) -> PromptSet:
        """Validate raw request values; every problem raises ``ValueError`` with what was wrong."""
        texts = _texts(texts)
        pts = _int_array(points, "points", (0, 3))
        if pts.ndim != 2 or (len(pts) and pts.shape[1] not in (2, 3)):
            raise ValueError(
                f"points must be a list of [i, j, k] (or [row, col] for 2D) voxel indices, got {_show(points)}"
            )
        if point_labels is None or len(np.asarray(point_labels)) == 0:
            labels = np.ones(len(pts), dtype=np.int64)  # clicks without labels are foreground clicks
        else:
            labels = _int_array(point_labels, "point_labels", (0,))
            if labels.ndim != 1 or len(labels) != len(pts):
                raise ValueError(
                    f"point_labels must give one value per point: {len(pts)} points, labels {_show(point_labels)}"
                )
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"point_labels must be 1 (foreground) or 0 (background), got {labels.tolist()}")
        bxs = _int_array(boxes, "boxes", (0, 6))
        if bxs.ndim == 1 and bxs.size in (4, 6):
            bxs = bxs[None]  # a single box given flat
        if bxs.ndim != 2 or (len(bxs) and bxs.shape[1] not in (4, 6)):
            raise ValueError(
                f"boxes must be a list of [i0, j0, k0, i1, j1, k1] (or [r0, c0, r1, c1] for 2D), got {_show(boxes)}"
            )
        if len(pts) and len(bxs) and pts.shape[1] * 2 != bxs.shape[1]:
            raise ValueError("points and boxes must have the same number of dimensions")
        prompt = cls(texts=texts, points=pts, point_labels=labels, boxes=bxs)
        if prompt.is_empty:
            raise ValueError("No prompts given: pass text prompts (label names or free text), points or boxes")
        if len(pts) and not (labels == 1).any() and not texts and not len(bxs):
            raise ValueError(
                "Background clicks alone cannot define a structure: add a foreground click, a box or a text prompt"
            )
        if (len(pts) or len(bxs)) and len(texts) > 1:
            raise ValueError(
                f"Clicks and boxes segment one structure, but {len(texts)} text prompts were given: give at most one"
            )
        return prompt

    @property
    def is_empty(self) -> bool:
        return not self.texts and len(self.points) == 0 and len(self.boxes) == 0

    @property
    def ndim(self) -> int | None:
        """Spatial dimensions the coordinates are given in (None when there are no coordinates)."""
        if len(self.points):
            return int(self.points.shape[1])
        if len(self.boxes):
            return int(self.boxes.shape[1] // 2)
        return None

    def points_3d(self) -> np.ndarray:
        """N x 3 click indices: a picture's (row, column) becomes (0, row, column), as in its single-slice view."""
        return _as_3d(self.points, 2)

    def boxes_3d(self) -> np.ndarray:
        """M x 6 inclusive boxes, a picture's as those of its single-slice view (see :meth:`points_3d`)."""
        return _as_3d(self.boxes, 4)

    def inside_boxes(self, shape: Sequence[int]) -> np.ndarray:
        """Which voxels (pixels) of an image of spatial ``shape`` lie inside any of the boxes."""
        inside = np.zeros(tuple(shape), dtype=bool)
        half = self.boxes.shape[1] // 2
        for box in self.boxes:
            inside[tuple(slice(int(a), int(b) + 1) for a, b in zip(box[:half], box[half:], strict=True))] = True
        return inside

    def check_inside(self, shape: Sequence[int]) -> None:
        """Raise when a point or box lies outside an image of the given spatial ``shape``."""
        ndim = self.ndim
        if ndim is None:
            return
        if ndim != len(shape):
            raise ValueError(
                f"Prompt coordinates have {ndim} dimensions but the image has {len(shape)} ({tuple(shape)})"
            )
        upper = np.asarray(shape)
        for point in self.points:
            if (point < 0).any() or (point >= upper).any():
                raise ValueError(f"Point {point.tolist()} is outside the image (shape {tuple(shape)})")
        for box in self.boxes:
            low, high = box[:ndim], box[ndim:]
            if (low > high).any():
                raise ValueError(f"Box {box.tolist()} has a start corner after its end corner")
            if (low < 0).any() or (high >= upper).any():
                raise ValueError(f"Box {box.tolist()} is outside the image (shape {tuple(shape)})")


def _as_3d(coords: np.ndarray, picture_width: int) -> np.ndarray:
    """Picture coordinates (rows ``picture_width`` wide: 2 for points, 4 for boxes) with a zero slice index before
    each corner; volume coordinates as they are."""
    if coords.shape[1] != picture_width:
        return coords
    zeros = np.zeros((len(coords), 1), dtype=coords.dtype)
    corners = np.split(coords, coords.shape[1] // 2, axis=1)
    return np.concatenate([part for corner in corners for part in (zeros, corner)], axis=1)


def _texts(texts: Sequence[str | int] | str | None) -> tuple[str, ...]:
    if texts is None:
        return ()
    if isinstance(texts, (str, int)):
        texts = [texts]
    out = []
    for text in texts:
        if not isinstance(text, (str, int)) or isinstance(text, bool):
            raise ValueError(f"Text prompts must be strings (names or free text) or label indices, got {text!r}")
        value = str(text).strip()
        if not value:
            raise ValueError("Empty text prompt")
        out.append(value)
    if len(set(t.lower() for t in out)) != len(out):
        raise ValueError(f"Duplicate text prompts: {out}")
    return tuple(out)


def _int_array(values: object, name: str, empty_shape: tuple[int, ...]) -> np.ndarray:
    if values is None:
        return np.zeros(empty_shape, dtype=np.int64)
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers, got {_show(values)}") from error
    if array.size == 0:
        return np.zeros(empty_shape, dtype=np.int64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain non-finite values: {_show(values)}")
    if not np.allclose(array, np.round(array)):
        raise ValueError(f"{name} must be integer voxel indices, got {_show(values)}")
    return np.round(array).astype(np.int64)


def _show(values: object, limit: int = 120) -> str:
    text = repr(values.tolist() if isinstance(values, np.ndarray) else values)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_list_argument(value: object, name: str) -> list | None:
    """Accept a list, or a JSON/Python-literal string of one (as ``monai.bundle run`` passes overrides)."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("none", "null"):
            return None
        if not text.startswith(("[", "(")):
            return [text]  # a single bare value, e.g. --prompts liver
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"--{name} is not a valid list: {value!r}") from error
        return list(parsed) if isinstance(parsed, (list, tuple)) else [parsed]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [value]  # a single bare number, e.g. --prompts 3 (a label index), which the command line passes as is
    raise ValueError(f"--{name} must be a list, got {type(value).__name__}")


def parse_flag(value: object, name: str) -> bool:
    """A yes/no option: a bool, or the strings ``monai.bundle run`` and HTTP clients pass (``false``, ``0``, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")
