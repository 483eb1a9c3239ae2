"""Validation during training: text-prompt Dice through the bundle's inference path, keeping the best weights.

The number is what users will get (:class:`scripts.inference.VolumeSegmenter`), and :func:`validation_dice` scores
other weights (the MONAI Label app's served ones) on the same footing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from .image_writing import read_labelled
from .inference import VolumeSegmenter
from .label_numbering import item_labels
from .metrics import dice
from .network import MedSam3
from .predictor import Medsam3Predictor
from .prompts import PromptSet
from .training import TrainableCheckpoint, is_main_process, unwrap

__all__ = ["TextPromptValidation", "validation_dice"]

logger = logging.getLogger(__name__)


class TextPromptValidation:
    """Every ``every`` iterations: text-prompt each validation volume, log mean Dice, keep the best weights.

    Uses the same inference path as the bundle (:class:`scripts.inference.VolumeSegmenter`), so the number is
    what users will get; ``model_best.pt`` holds what :class:`TrainableCheckpoint` would save at that point.
    """

    def __init__(
        self,
        items: Sequence[dict[str, Any]],
        labels: dict[int, str],
        vocabulary: Any,
        output_dir: str,
        mode: str,
        every: int,
        score_threshold: float = 0.5,
    ) -> None:
        self.items, self.labels, self.vocabulary = list(items), dict(labels), vocabulary
        for item in self.items:  # now, not at the first validation after minutes or hours of training
            _check_item(item, self.labels)
        self.best_path = Path(output_dir) / "model_best.pt"
        self.mode, self.every, self.score_threshold = mode, every, score_threshold
        self.best = -1.0
        self.history: list[tuple[int, float]] = []

    def attach(self, engine: Engine) -> None:
        if self.every > 0 and self.items:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)

    def __call__(self, engine: Engine) -> float:
        if not is_main_process():
            return self.best
        model = unwrap(engine.network)
        mean = validation_dice(model, self.items, self.labels, self.vocabulary, self.score_threshold)
        model.train()
        self.history.append((engine.state.iteration, mean))
        engine.state.metrics["val_mean_dice"] = mean
        logger.info("Validation mean Dice %.4f at iteration %d (best %.4f)", mean, engine.state.iteration, self.best)
        if mean > self.best:
            self.best = mean
            TrainableCheckpoint(str(self.best_path.parent), self.mode, name=self.best_path.name)._save(engine)
        return mean


def validation_dice(
    model: MedSam3,
    items: Sequence[dict[str, Any]],
    labels: dict[int, str],
    vocabulary: Any,
    score_threshold: float = 0.5,
) -> float:
    """Mean text-prompt Dice over every named label of ``items``, through the bundle's inference path: what
    :class:`TextPromptValidation` scores, so other weights (the served ones) can be scored on the same footing."""
    segmenter = VolumeSegmenter(Medsam3Predictor(model, score_threshold=score_threshold), vocabulary)
    scores = []
    for item in items:
        values: dict[str, list[int]] = {}
        for value, name in item_labels(item, labels).items():
            values.setdefault(name, []).append(value)
        image, reference = read_labelled(item["image"], item["label"])
        result = segmenter.segment(image, PromptSet.create(texts=list(values)))
        for name_values, row in zip(values.values(), result.labels, strict=True):
            scores.append(dice(result.label == row["index"], np.isin(reference.array, name_values)))
    return float(sum(scores) / len(scores))


def _check_item(item: dict[str, Any], labels: dict[int, str]) -> None:
    """A validation item that validation would fail on: no label, a file missing, no or clashing label names."""
    if "label" not in item:
        raise ValueError(f"Validation item {item['image']} has no 'label' to score against")
    missing = [item[key] for key in ("image", "label") if not Path(item[key]).exists()]
    if missing:
        raise ValueError(f"Validation files not found: {', '.join(map(str, missing))}")
    names = list(dict.fromkeys(item_labels(item, labels).values()))
    if not names:
        raise ValueError(f"Validation item {item['label']} names no labels")
    PromptSet.create(texts=names)  # names that differ only in case or spacing would be one prompt twice
