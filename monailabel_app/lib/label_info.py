"""What the voxel values of a submitted label mean: Slicer's ``label_info``, else the app's own numbering.

Slicer numbers the segments it submits 1..N in the order of ``label_info`` ([{"name": ...}, ...]; its ``idx`` is
not the voxel value). The trainer and the DICOM SEG writer both read names this way.
"""

from __future__ import annotations

from typing import Any


def names_by_value(label_info: Any, app_values: dict[str, int]) -> dict[int, str]:
    """``{voxel value: name}`` from ``label_info``, or from the app's ``{name: value}`` when it is absent."""
    if isinstance(label_info, list) and label_info:
        if not all(isinstance(entry, dict) for entry in label_info):
            raise ValueError(f"label_info must be a list of {{'name': ...}} entries, got {label_info!r:.200}")
        return {i: str(entry.get("name", "")).strip() for i, entry in enumerate(label_info, start=1)}
    return {value: name for name, value in app_values.items()}
