"""What ``inference.json`` runs: segment one image, a folder or a whole datalist and write label maps with JSON.

The config files name these functions; the functions take plain values (as overrides arrive on the command
line), validate them once and report problems as ``ValueError`` messages that say what to change.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .image_io import DICOM_SUFFIX, ITK_SUFFIXES, NIFTI_SUFFIXES, PICTURE_SUFFIXES, ImageVolume, read_image
from .image_writing import output_path_for, write_label
from .inference import SegmentationResult, VolumeSegmenter
from .label_numbering import read_datalist
from .prompts import PromptSet, parse_list_argument

__all__ = ["collect_images", "datalist_items", "run_inference"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_SUFFIXES, *PICTURE_SUFFIXES, DICOM_SUFFIX)  # what read_image reads
DICOM_PREAMBLE = (128, b"DICM")  # where a DICOM file says what it is: exports often name files without .dcm


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
    return path.is_dir() and any(p.is_file() and _is_dicom_file(p) for p in path.iterdir())


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    offset, magic = DICOM_PREAMBLE
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def datalist_items(path: Path, key: str, required: bool = True) -> list[dict[str, Any]]:
    """The ``key`` list of a MONAI datalist with paths made absolute; ``required=False`` allows none."""
    data = read_datalist(path)
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
