"""Uncertainty scoring (a scoring method) and the strategy that picks the most uncertain unlabelled image."""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from scripts.image_io import read_image
from scripts.uncertainty import image_uncertainty

from ..model_service import ModelService

logger = logging.getLogger(__name__)

SCORE_KEY = "medsam3_uncertainty"


class UncertaintyScoring(ScoringMethod):
    """Scores every unlabelled image (mean over ``labels`` of undecided presence and synonym disagreement)."""

    def __init__(self, service: ModelService, labels: list[str]) -> None:
        super().__init__("Medical SAM3 uncertainty: undecided presence scores and disagreement between synonyms")
        self.service = service
        self.labels = labels

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        if not self.service.ready:
            logger.warning("Uncertainty scoring skipped: Medical SAM3 is %s", self.service.status)
            return {}
        results = {}
        for image_id in datastore.get_unlabeled_images():
            try:
                image = read_image(datastore.get_image_uri(image_id), max_voxels=self.service.settings.max_voxels)
            except ValueError as error:
                logger.warning("Uncertainty scoring skipped %s: %s", image_id, error)
                continue
            scores = self.service.run(lambda segmenter, image=image: image_uncertainty(segmenter, image, self.labels))
            datastore.update_image_info(image_id, {SCORE_KEY: scores})
            results[image_id] = scores
        logger.info("Uncertainty scores: %s", {k: v["score"] for k, v in results.items()})
        return results


class Uncertainty(Strategy):
    """The unlabelled image with the highest uncertainty score; unscored images come after scored ones."""

    def __init__(self) -> None:
        super().__init__("Most uncertain unlabelled image (run the medsam3_uncertainty scoring first)")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None

        def score(image_id: str) -> float:
            return float(datastore.get_image_info(image_id).get(SCORE_KEY, {}).get("score", -1.0))

        best = max(sorted(images), key=score)
        logger.info("Uncertainty: selected %s (score %.3f)", best, score(best))
        return {"id": best, "uncertainty_score": score(best)}
