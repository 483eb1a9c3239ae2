"""Medical SAM3 MONAI Label app: text- and click-prompted segmentation for 3D Slicer and OHIF.

    monailabel start_server --app monailabel_app --studies <folder> --conf model_size tiny --conf checkpoint random

Options (``--conf key value``): the app's own are :class:`lib.settings.AppSettings`; any other key overrides an id of
the served bundle's ``configs/inference.json`` (``docs/monailabel.md`` lists them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lib.activelearning.uncertainty import Uncertainty, UncertaintyScoring
from lib.errors import install_error_handlers
from lib.infers.auto_segmentation import AutoSegmentation
from lib.infers.interactive import InteractiveSegmentation
from lib.infers.vista3d_prompts import Vista3dPrompts
from lib.model_service import ModelService, warm_up_io
from lib.published_weights import PublishedWeights
from lib.settings import AppSettings, names
from lib.trainers.fine_tuning import FineTuning
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class Medsam3App(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.settings = AppSettings.from_conf(conf)
        self.model_dir = Path(self.settings.model_dir or Path(app_dir) / "model")
        self.service = ModelService(self.settings, PublishedWeights(self.model_dir))
        self.label_names = self.service.offered_labels(names(self.settings.labels))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Medical SAM3",
            description="Promptable segmentation by text and clicks (Medical SAM3)",
            version=VERSION,
            labels=list(self.label_names),  # OHIF expects a list here; the tasks carry {name: value}
        )

    def init_infers(self) -> dict[str, Any]:
        return {
            "medsam3_auto": AutoSegmentation(self.service, self.label_names),
            "medsam3_clicks": InteractiveSegmentation(self.service, self.label_names),
            "medsam3_vista3d": Vista3dPrompts(self.service, self.label_names),
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"medsam3": FineTuning(self.settings, self.label_names, self.model_dir)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First(), "uncertainty": Uncertainty()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        """Uncertainty scoring when ``--conf scoring_labels`` names labels (MONAI Label runs it in a subprocess
        that loads its own copy of the model, at start-up and after each submitted label)."""
        wanted = names(self.settings.scoring_labels)
        if not wanted:
            return {}
        return {"medsam3_uncertainty": UncertaintyScoring(self.service, list(self.service.offered_labels(wanted)))}

    def on_init_complete(self) -> None:
        """The server (not MONAI Label's training subprocess) loads the model at start-up."""
        install_error_handlers()
        self.service.load()
        warm_up_io()
        super().on_init_complete()
        logger.info(
            "Medical SAM3 (bundle %s, %s): %s", self.settings.bundle, self.settings.overrides, self.service.status
        )
