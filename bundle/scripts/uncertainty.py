"""How unsure the model is about an image: the score active learning ranks unlabelled images by.

Two signals per label, both in [0, 1]: how undecided the presence score is (1 at 0.5, 0 at 0 or 1), and how
much the masks for two synonyms of the label disagree (1 - Dice). An image whose labels the model cannot
decide on, or segments differently depending on the wording, is worth an annotator's time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .image_io import ImageVolume
from .inference import VolumeSegmenter
from .predictor import PromptResult

__all__ = ["image_uncertainty", "prompt_disagreement", "undecided"]


def undecided(result: PromptResult) -> float:
    """1 - |2s - 1| for the prompt's best score s: 1 when the model cannot say if the structure is there."""
    return float(1.0 - abs(2.0 * result.score - 1.0))


def prompt_disagreement(a: PromptResult, b: PromptResult) -> float:
    """1 - Dice of two prompts' masks over the whole stack (0 when both are empty)."""
    mask_a, mask_b = a.logits > 0, b.logits > 0
    total = int(mask_a.sum() + mask_b.sum())
    if total == 0:
        return 0.0
    return float(1.0 - 2.0 * int((mask_a & mask_b).sum()) / total)


def image_uncertainty(segmenter: VolumeSegmenter, image: ImageVolume, labels: Sequence[str]) -> dict[str, float]:
    """Per label and overall (``"score"``, the mean) uncertainty of ``image``; higher means more to learn."""
    if not labels:
        raise ValueError("No labels to score")
    scores: dict[str, float] = {}
    for name in labels:
        entry = segmenter.vocabulary.resolve(name)
        # One text pass per wording; the encoding is shared (and cached when the segmenter has a cache).
        encoding = segmenter.encode(image, name)
        results = segmenter.predictor.segment_text(encoding, list(entry.prompts[:2]))
        value = undecided(results[0])
        if len(results) > 1:
            value = 0.5 * (value + prompt_disagreement(results[0], results[1]))
        scores[entry.name] = round(value, 4)
    scores["score"] = round(float(torch.tensor(list(scores.values())).mean()), 4)
    return scores
