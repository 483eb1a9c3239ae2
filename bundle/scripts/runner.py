"""What ``python -m monai.bundle run`` calls: load the network, segment one image or a whole dataset, evaluate.

The config files name these functions; the functions take plain values (as overrides arrive on the command
line), validate them once and report problems as ``ValueError`` messages that say what to change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .click_simulation import run_interactive_evaluation
from .image_io import ImageVolume, output_path_for, read_image, write_label
from .inference import SegmentationResult, VolumeSegmenter
from .metrics import evaluate_label_maps, summarise, write_metrics_csv
from .prompts import PromptSet, parse_list_argument

__all__ = ["collect_images", "datalist_items", "label_names_from", "run_evaluation", "run_inference"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".dcm")


def collect_images(image: str | None = None, datalist: str | None = None, key: str = "testing") -> list[dict[str, Any]]:
    """Items ``{"image": path, ...}`` from one file, a DICOM series folder, a folder of images, or a datalist."""
    if datalist:
        return datalist_items(Path(datalist), key)
    if not image:
        raise ValueError("No input: pass --image <file, DICOM folder or folder of images> or --datalist <json>")
    path = Path(image)
    if not path.exists():
        raise ValueError(f"Input not found: {path}")
    if path.is_dir() and not _is_dicom_folder(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        files += sorted(p for p in path.iterdir() if p.is_dir() and _is_dicom_folder(p))
        if not files:
            raise ValueError(f"No images found in {path} (looked for {', '.join(IMAGE_SUFFIXES)} and DICOM folders)")
        return [{"image": str(p)} for p in files]
    return [{"image": str(path)}]


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _read_datalist(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read datalist {path}: {error}") from error


def datalist_items(path: Path, key: str, required: bool = True) -> list[dict[str, Any]]:
    """The ``key`` list of a MONAI datalist with paths made absolute; ``required=False`` allows none."""
    data = _read_datalist(path)
    items = data.get(key) if isinstance(data, dict) else data
    if not required and not items:
        return []
    if not isinstance(items, list) or not items:
        raise ValueError(f"Datalist {path} has no {key!r} list of items")
    base = path.parent
    out = []
    for item in items:
        item = {"image": item} if isinstance(item, str) else dict(item)
        if "image" not in item:
            raise ValueError(f"Datalist item without 'image' in {path}: {item}")
        for name in ("image", "label"):
            if name in item and not Path(item[name]).is_absolute():
                item[name] = str(base / item[name])
        out.append(item)
    return out


def run_inference(
    segmenter: VolumeSegmenter,
    output_dir: str,
    image: str | None = None,
    datalist: str | None = None,
    prompts: Sequence[str] | str | None = None,
    points: Sequence | str | None = None,
    point_labels: Sequence | str | None = None,
    boxes: Sequence | str | None = None,
    output_ext: str = ".nii.gz",
) -> list[dict[str, Any]]:
    """Segment every input and write ``<name><ext>`` plus ``<name>.json`` (labels, scores, timings) per input."""
    prompt_set = PromptSet.create(
        texts=parse_list_argument(prompts, "prompts"),
        points=parse_list_argument(points, "points"),
        point_labels=parse_list_argument(point_labels, "point_labels"),
        boxes=parse_list_argument(boxes, "boxes"),
    )
    if output_ext not in (".nii.gz", ".nii", ".nrrd", ".png"):
        raise ValueError(f"output_ext must be .nii.gz, .nii, .nrrd or .png, got {output_ext!r}")
    items = collect_images(image, datalist)
    if len(items) > 1 and (len(prompt_set.points) or len(prompt_set.boxes)):
        raise ValueError("Points and boxes are voxel indices of one image: use them with a single --image")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for item in tqdm(items, desc="Medical SAM3", unit="image", disable=len(items) == 1):
        volume = read_image(item["image"])
        result = segmenter.segment(volume, prompt_set)
        summaries.append(_write_result(volume, result, out_dir, output_ext))
    return summaries


def _write_result(volume: ImageVolume, result: SegmentationResult, out_dir: Path, ext: str) -> dict[str, Any]:
    if ext == ".png" and not volume.is_2d:
        raise ValueError(f"PNG output is for 2D images; {volume.path} is 3D: use .nii.gz or .nrrd")
    target = write_label(result.label, volume, output_path_for(volume.path, out_dir, suffix=ext))
    summary = {"image": str(volume.path), "output": str(target), **result.summary()}
    json_path = output_path_for(volume.path, out_dir, suffix=".json")
    json_path.write_text(json.dumps(summary, indent=2))
    logger.info("Wrote %s (%s)", target, ", ".join(f"{r['name']}: {r['score']:.2f}" for r in result.labels))
    return summary


def run_evaluation(
    segmenter: VolumeSegmenter,
    datalist: str,
    output_dir: str,
    labels: dict | str | None = None,
    key: str = "testing",
    tolerance_mm: float = 2.0,
    interactive_clicks: Sequence[int] | None = (1, 3, 5),
) -> dict[str, Any]:
    """Text-prompt each reference label of every datalist item and score Dice and NSD per label.

    ``labels`` maps label values in the reference masks to names (``{"1": "liver"}``); default: the datalist's
    own ``labels`` entry. Writes ``metrics.csv`` (one row per case and label) and ``summary.json``; with
    ``interactive_clicks`` (and tracker weights) also the click protocol's ``interactive.csv`` and its plot.
    """
    items = datalist_items(Path(datalist), key)
    label_map = label_names_from(labels, Path(datalist))
    rows: list[dict[str, Any]] = []
    prompt_set = PromptSet.create(texts=list(label_map.values()))
    for item in tqdm(items, desc="Evaluating", unit="image"):
        if "label" not in item:
            raise ValueError(f"Datalist item {item['image']} has no 'label' to evaluate against")
        volume, reference = read_image(item["image"]), read_image(item["label"])
        if reference.array.shape != volume.array.shape:
            raise ValueError(f"Label {item['label']} has shape {reference.array.shape}, image {volume.array.shape}")
        result = segmenter.segment(volume, prompt_set)
        predicted = _to_reference_values(result, label_map)
        for row in evaluate_label_maps(
            predicted, reference.array.astype(np.int64), label_map, volume.spacing, tolerance_mm
        ):
            rows.append({"image": item["image"], **row})
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(rows, out_dir / "metrics.csv")
    summary = summarise(rows)
    if interactive_clicks and getattr(segmenter.predictor.model, "interactive", True):
        interactive = run_interactive_evaluation(segmenter, items, label_map, out_dir, interactive_clicks)
        for name, entry in summary.items():
            for count in interactive_clicks:
                values = [r["dice"] for r in interactive if r["name"] == name and r["clicks"] == count]
                entry[f"dice_{count}_clicks"] = float(np.mean(values)) if values else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("Evaluation summary: %s", json.dumps(summary))
    return summary


def label_names_from(labels: dict | str | None, datalist: Path) -> dict[int, str]:
    """``{value: name}`` from an override (dict or its string) or the datalist's ``labels`` entry.

    Without either, the names of the items' own ``labels`` maps, in order of appearance (numbered from 1).
    """
    if isinstance(labels, str):
        labels = parse_list_argument(f"[{labels}]", "labels")[0] if labels.strip().startswith("{") else None
    if labels is None:
        data = _read_datalist(datalist)
        labels = data.get("labels") if isinstance(data, dict) else None
        if labels is None:
            lists = [data.get(key) or [] for key in ("training", "validation")] if isinstance(data, dict) else [data]
            items = [item for entries in lists for item in entries if isinstance(item, dict)]
            unnamed = [i.get("label", i.get("image")) for i in items if not i.get("labels")]
            if unnamed and len(unnamed) < len(items):
                raise ValueError(f"Items {unnamed[:3]} have no 'labels' map: give one per item or one for the dataset")
            names = dict.fromkeys(n for i in items for n in (i.get("labels") or {}).values())
            labels = {value: name for value, name in enumerate(names, start=1)} or None
    if not isinstance(labels, dict) or not labels:
        raise ValueError("No label names: give --labels \"{'1': 'liver'}\" or a 'labels' map in the datalist")
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except ValueError as error:
        raise ValueError(f"Label values must be integers, got {list(labels)}") from error


def _to_reference_values(result: SegmentationResult, label_map: dict[int, str]) -> np.ndarray:
    """Renumber the predicted map (vocabulary indices) to the reference's values, prompt by prompt."""
    out = np.zeros(result.label.shape, dtype=np.int64)
    for value, row in zip(label_map, result.labels, strict=True):
        out[result.label == row["index"]] = value
    return out
