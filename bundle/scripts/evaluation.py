"""What ``evaluate.json`` runs: Dice and NSD of text prompts per label, then the interactive click protocol.

The interactive protocol (SAM-Med3D / nnInteractive): the first click goes to the deepest point of the structure,
each later one to the deepest point of the largest error of the previous result (:func:`scripts.clicks.next_click`),
and Dice is recorded after each requested number of clicks. A click the protocol has already given (the result did
not change where it was wrong) is not given again: the row says so in ``repeated_click`` and the later counts keep
that result.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .clicks import next_click
from .image_writing import read_labelled
from .inference import VolumeSegmenter
from .label_numbering import dataset_labels, item_labels, renumber
from .metrics import dice, evaluate_label_maps, summarise, write_metrics_csv
from .prompts import PromptSet, parse_flag
from .runner import datalist_items

__all__ = ["run_evaluation", "run_interactive_evaluation"]

logger = logging.getLogger(__name__)


def run_evaluation(
    segmenter: VolumeSegmenter,
    datalist: str,
    output_dir: str,
    labels: dict | str | None = None,
    key: str = "testing",
    tolerance_mm: float = 2.0,
    interactive_clicks: Sequence[int] | None = (1, 3, 5),
    interactive_text: bool | str = True,
) -> dict[str, Any]:
    """Text-prompt each reference label of every datalist item and score Dice and NSD per label.

    ``labels`` maps label values in the reference masks to names (``{"1": "liver"}``); default: the datalist's
    own ``labels`` entry. Writes ``metrics.csv`` (one row per case and label) and ``summary.json``; with
    ``interactive_clicks`` (and tracker weights) also the click protocol's ``interactive.csv`` and its plot, the
    clicks refining the label's text result (``interactive_text``) or alone.
    """
    interactive_text = parse_flag(interactive_text, "interactive_text")
    items = datalist_items(Path(datalist), key)
    label_map = dataset_labels(labels, Path(datalist))
    rows: list[dict[str, Any]] = []
    prompt_set = PromptSet.create(texts=list(label_map.values()))
    for item in tqdm(items, desc="Evaluating", unit="image"):
        if "label" not in item:
            raise ValueError(f"Datalist item {item['image']} has no 'label' to evaluate against")
        volume, reference = read_labelled(item["image"], item["label"])
        result = segmenter.segment(volume, prompt_set)
        # The prediction carries vocabulary values, the reference the dataset's: prompt p is reference value p.
        to_reference = {row["index"]: value for value, row in zip(label_map, result.labels, strict=True)}
        predicted = renumber(result.label, to_reference, np.int64)
        scored, in_dataset_values = _in_dataset_values(item, label_map, reference.array)
        for row in evaluate_label_maps(predicted, in_dataset_values, scored, volume.spacing, tolerance_mm):
            rows.append({"image": item["image"], **row})
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(rows, out_dir / "metrics.csv")
    summary = summarise(rows)
    if interactive_clicks and getattr(segmenter.predictor.model, "interactive", True):
        interactive = run_interactive_evaluation(
            segmenter, items, label_map, out_dir, interactive_clicks, with_text=interactive_text
        )
        for name, entry in summary.items():
            for count in interactive_clicks:
                values = [r["dice"] for r in interactive if r["name"] == name and r["clicks"] == count]
                entry[f"dice_{count}_clicks"] = float(np.mean(values)) if values else None
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("Evaluation summary: %s", json.dumps(summary))
    return summary


def run_interactive_evaluation(
    segmenter: VolumeSegmenter,
    items: Sequence[dict[str, Any]],
    labels: dict[int, str],
    output_dir: str | Path,
    clicks: Sequence[int] = (1, 3, 5),
    with_text: bool = True,
) -> list[dict[str, Any]]:
    """Dice after each number of simulated clicks, per case and label; writes ``interactive.csv`` and a plot.

    With ``with_text`` the clicks come with the label's text prompt (a user refining a named structure); without,
    clicks alone define the structure. Rows: ``image``, ``label``, ``name``, ``clicks``, ``dice``,
    ``repeated_click`` (the protocol's next click had already been given, so no new click was added).
    """
    if not clicks or min(clicks) < 1:
        raise ValueError(f"clicks must be positive counts, got {list(clicks)}")
    rows = []
    for item in items:
        volume, label = read_labelled(item["image"], item["label"])
        scored, reference = _in_dataset_values(item, labels, label.array)
        for value, name in scored.items():
            target = reference == value
            if not target.any():
                logger.info("%s has no %s: skipped in the interactive evaluation", item["image"], name)
                continue
            base = {"image": item["image"], "label": value, "name": name}
            for count, score, repeated in _click_session(
                segmenter, volume, target, name if with_text else None, clicks
            ):
                rows.append({**base, "clicks": count, "dice": score, "repeated_click": repeated})
    _write(rows, Path(output_dir), clicks)
    return rows


def _in_dataset_values(
    item: dict[str, Any], label_map: dict[int, str], reference: np.ndarray
) -> tuple[dict[int, str], np.ndarray]:
    """The labels ``item`` annotates (``{dataset value: name}``) and its reference in the dataset's values. An item
    may number its structures its own way (its ``labels`` map, two values may share a name): each of its values
    becomes the dataset's value of the same name, and labels it does not annotate are not scored on it."""
    own = item_labels(item, label_map)
    value_of = {name: value for value, name in label_map.items()}
    unknown = sorted({name for name in own.values() if name not in value_of})
    if unknown:
        logger.warning("%s labels %s, which the evaluation does not ask for: not scored", item["label"], unknown)
    converted = np.zeros(reference.shape, np.int64)
    for value, name in own.items():
        if name in value_of:
            converted[reference == value] = value_of[name]
    return {value_of[name]: name for name in dict.fromkeys(own.values()) if name in value_of}, converted


def _click_session(
    segmenter: VolumeSegmenter, volume: Any, target: np.ndarray, text: str | None, clicks: Sequence[int]
) -> list[tuple[int, float, bool]]:
    """``(clicks, Dice, repeated)`` at each requested count of one simulated session on one structure."""
    points: list[tuple[int, ...]] = []
    point_labels: list[int] = []
    prediction = np.zeros_like(target)
    score, repeated, out = 0.0, False, []
    for count in range(1, max(clicks) + 1):
        click = None if repeated else next_click(prediction, target, volume.spacing)
        if click is None and not repeated:
            score = 1.0  # already perfect: later counts keep the result
        elif click is not None:
            point = tuple(int(v) for v in click[0])
            if point in points:
                repeated = True  # the result did not change where it was wrong: no new information to add
                logger.info("Click %d on %s repeats %s: the result did not change", count, text or "clicks", point)
            else:
                points.append(point)
                point_labels.append(click[1])
                prompts = PromptSet.create(
                    texts=[text] if text else None, points=np.array(points), point_labels=point_labels
                )
                prediction = segmenter.segment(volume, prompts).label > 0
                score = dice(prediction, target)
        if count in clicks:
            out.append((count, score, repeated))
    return out


def _write(rows: list[dict[str, Any]], output_dir: Path, clicks: Sequence[int]) -> None:
    if not rows:
        raise ValueError("No case had any of the evaluated labels: nothing to evaluate")
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "interactive.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure = Figure(figsize=(5, 4))  # no pyplot: the caller's matplotlib backend and state stay untouched
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    for name in dict.fromkeys(row["name"] for row in rows):
        means = [
            np.mean([r["dice"] for r in rows if r["name"] == name and r["clicks"] == c] or [np.nan]) for c in clicks
        ]
        axis.plot(list(clicks), means, marker="o", label=name)
    axis.set(xlabel="simulated clicks", ylabel="mean Dice", ylim=(0, 1), title="Medical SAM3: Dice against clicks")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "interactive_dice.png", dpi=100)
