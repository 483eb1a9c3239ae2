"""Which voxel value stands for which structure: one identity, and the views clients and datasets need.

The identity is the vocabulary index (``bundle/configs/vocabulary.json``): the bundle's label maps use it, and free
text gets the values after the vocabulary's last index, in prompt order. Two views map onto it, each in one
function here:

* clients (3D Slicer, OHIF) number the labels a model offers 1..N in the order offered (:func:`client_values`);
* datasets number their reference labels as they like, named by a ``labels`` map such as ``{"1": "liver"}``
  (:func:`dataset_labels`, per item :func:`item_labels`); names resolve to the vocabulary.

:func:`renumber` turns a label map from one numbering into another.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .prompts import parse_list_argument
from .vocabulary import ResolvedPrompt, Vocabulary

__all__ = [
    "client_values",
    "dataset_labels",
    "item_labels",
    "read_datalist",
    "renumber",
    "to_client_values",
    "value_names",
    "vocabulary_values",
]


def vocabulary_values(entries: Sequence[ResolvedPrompt], vocabulary: Vocabulary) -> list[int]:
    """The output value of each resolved prompt: its vocabulary index, or the next free value for free text."""
    next_free = max(vocabulary.by_index, default=0) + 1
    values = []
    for entry in entries:
        if entry.known:
            values.append(int(entry.index))
        else:
            values.append(next_free)
            next_free += 1
    return values


def client_values(vocabulary: Vocabulary, names: Iterable[str] | None = None) -> dict[str, int]:
    """``{name: 1..N}``: the labels a client is offered (``names``, default the whole vocabulary), in order.

    Slicer maps voxel value v to the v-th offered name and OHIF to the value listed for it, so values are
    contiguous from 1 whatever the vocabulary indices; names outside the vocabulary are refused.
    """
    entries = [vocabulary.resolve(n) for n in names] if names else [vocabulary.resolve(e.index) for e in vocabulary]
    unknown = [e.name for e in entries if not e.known]
    if unknown:
        raise ValueError(f"Labels not in the vocabulary: {unknown}")
    return {name: value for value, name in enumerate(dict.fromkeys(e.name for e in entries), start=1)}


def to_client_values(
    rows: Sequence[Mapping[str, Any]], offered: Mapping[str, int]
) -> tuple[dict[int, int], dict[str, int]]:
    """How a result's label map (vocabulary values, ``rows`` as :class:`scripts.inference.SegmentationResult`'s)
    becomes a client's: ``({result value: client value}, {name: client value})``. Offered names keep their
    :func:`client_values` value; other structures (free text) get the values after them, in row order."""
    names = dict(offered)
    mapping = {}
    for row in rows:
        mapping[int(row["index"])] = names.setdefault(str(row["name"]), max(names.values(), default=0) + 1)
    return mapping, names


def value_names(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{"value": name}`` of a result's label rows: the mapping a result file's JSON states."""
    return {str(row["index"]): str(row["name"]) for row in rows}


def renumber(label: np.ndarray, mapping: Mapping[int, int], dtype: np.dtype | type = np.uint16) -> np.ndarray:
    """``label`` with each value ``v`` of ``mapping`` replaced by ``mapping[v]``; unmapped values become 0."""
    values = np.asarray(list(mapping), dtype=np.int64)
    out = np.zeros(label.shape, dtype=dtype)
    if not len(values) or not label.size:
        return out
    lut = np.zeros(int(max(values.max(), label.max())) + 1, dtype=dtype)
    lut[values] = np.asarray(list(mapping.values()), dtype=dtype)
    return lut[np.clip(label, 0, None).astype(np.int64)]


def read_datalist(path: Path) -> Any:
    """A MONAI datalist JSON; unreadable files raise ``ValueError`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read datalist {path}: {error}") from error


def dataset_labels(labels: Mapping | str | None, datalist: Path) -> dict[int, str]:
    """``{value: name}`` of a dataset's references, from an override (dict or its string) or the datalist.

    Default: the datalist's ``labels`` entry; without one, the names of the items' own ``labels`` maps, in order of
    appearance (numbered from 1).
    """
    if isinstance(labels, str):
        text = labels.strip()
        if text and text.lower() not in ("none", "null") and not text.startswith("{"):
            raise ValueError(f"--labels must map label values to names, e.g. \"{{'1': 'liver'}}\", got {labels!r}")
        labels = parse_list_argument(f"[{text}]", "labels")[0] if text.startswith("{") else None
    if labels is None:
        data = read_datalist(datalist)
        labels = data.get("labels") if isinstance(data, dict) else None
        if labels is None:
            keys = ("training", "validation", "testing")
            lists = [data.get(key) or [] for key in keys] if isinstance(data, dict) else [data]
            items = [item for entries in lists for item in entries if isinstance(item, dict)]
            unnamed = [i.get("label", i.get("image")) for i in items if not i.get("labels")]
            if unnamed and len(unnamed) < len(items):
                raise ValueError(f"Items {unnamed[:3]} have no 'labels' map: give one per item or one for the dataset")
            names = dict.fromkeys(n for i in items for n in (i.get("labels") or {}).values())
            labels = {value: name for value, name in enumerate(names, start=1)} or None
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("No label names: give --labels \"{'1': 'liver'}\" or a 'labels' map in the datalist")
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except ValueError as error:
        raise ValueError(f"Label values must be integers, got {list(labels)}") from error


def item_labels(item: Mapping[str, Any], labels: Mapping[int, str]) -> dict[int, str]:
    """``{value: name}`` of one datalist item: its own ``labels`` map, else the dataset's."""
    own = item.get("labels")
    if own is None:
        return dict(labels)
    try:
        return {int(value): str(name) for value, name in own.items()}
    except (AttributeError, ValueError) as error:
        raise ValueError(f"{item.get('label')}: 'labels' must map integer values to names, got {own!r}") from error
