"""The publish gate: a run replaces the served weights only when it scores at least as well on the same images.

Annotators' labels are few and noisy and a short run can overfit or diverge; publishing it regardless would make
the next click worse for everyone. Both sides are scored by the bundle's own validation
(:func:`scripts.validation.validation_dice`, what the run's ``TextPromptValidation`` uses) on the run's held-out
images: the run by its best validation, the served weights (the published file, else the base checkpoint) once
before training.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.bundle import ConfigParser

from scripts.checkpoint import load_network
from scripts.validation import validation_dice

from ..published_weights import PublishedWeights

logger = logging.getLogger(__name__)

TOLERANCE = 1e-6  # the same weights scored twice may differ in the last bits


def served_dice(config_files: list[str], overrides: dict[str, Any], published: PublishedWeights) -> tuple[float, str]:
    """``(Dice, which weights)`` of the weights the server serves now, on the run's validation images.

    The network is built as the run's (``train.json`` with the run's overrides) and loaded as the server loads it
    (:class:`lib.model_service.ModelService`): a published full checkpoint replaces ``ckpt_path``, a published
    adapter loads on top of it.
    """
    _, adapter, full = published.current()
    parser = ConfigParser()
    parser.read_config(config_files)
    parser.update({**overrides, **({"ckpt_path": full} if full else {})})
    checkpoint = parser.get_parsed_content("ckpt_path")
    network = load_network(
        parser.get_parsed_content("network_def"),
        checkpoint,
        parser.get_parsed_content("tracker_ckpt_path") or None,
        adapter,
        parser.get_parsed_content("text_encoder_ckpt_path") or None,
    )
    score = validation_dice(
        network,
        parser.get_parsed_content("validation#items"),
        parser.get_parsed_content("label_map"),
        parser.get_parsed_content("vocabulary"),
    )
    return score, full or adapter or f"base weights ({checkpoint})"


def publish_decision(run: float | None, served: float | None, images: int, force: bool = False) -> tuple[bool, str]:
    """``(publish?, why)`` from the run's validation Dice and the served weights' on the same ``images``; None is
    a score there is not (no validation images, served weights that could not be scored)."""
    if force:
        return True, "published on request (force_publish), whatever its validation Dice"
    if run is None:
        return True, "published without comparison: no validation images (raise validation_fraction to compare)"
    if served is None:
        return True, f"published with validation Dice {run:.4f}: the served weights could not be scored"
    if run + TOLERANCE >= served:
        return True, f"published: validation Dice {run:.4f} >= the served weights' {served:.4f} on {images} images"
    return False, (
        f"not published: validation Dice {run:.4f} < the served weights' {served:.4f} on the same {images} images; "
        "the run's weights stay in its folder (force_publish true publishes anyway)"
    )
