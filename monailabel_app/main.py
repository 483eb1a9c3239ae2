"""Medical SAM3 MONAI Label app: text- and click-prompted segmentation for 3D Slicer and OHIF.

    monailabel start_server --app monailabel_app --studies <folder> --conf model_size tiny --conf checkpoint random

Options (``--conf key value``): the app's own are :class:`lib.settings.AppSettings`; any other key overrides an id of
the served bundle's ``configs/inference.json`` (``docs/monailabel.md`` lists them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from lib.activelearning.uncertainty import Uncertainty, UncertaintyScoring
from lib.datastore import SafeSessions, open_datastore, open_sessions
from lib.dicomweb import PacsDatastore
from lib.dicomweb_proxy import install_dicomweb_proxy
from lib.errors import install_error_handlers
from lib.infers.auto_segmentation import AutoSegmentation
from lib.infers.interactive import InteractiveSegmentation
from lib.infers.vista3d_prompts import Vista3dPrompts
from lib.model_service import ModelService, warm_up_io
from lib.published_weights import PublishedWeights
from lib.request_guard import install_request_guards
from lib.security import install_security
from lib.settings import AppSettings, names
from lib.trainers.fine_tuning import FineTuning
from lib.trainers.run_guard import mark_server_process
from monailabel.config import settings as monailabel_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
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
        if len(self.label_names) > self.settings.max_prompts:  # Auto without labels asks for every offered one
            raise ValueError(
                f"--conf max_prompts {self.settings.max_prompts} is below the {len(self.label_names)} labels offered: "
                "raise it, or offer fewer with --conf labels"
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Medical SAM3",
            description="Promptable segmentation by text and clicks (Medical SAM3)",
            version=VERSION,
            labels=list(self.label_names),  # OHIF expects a list here; the tasks carry {name: value}
        )

    def init_datastore(self) -> Datastore:
        """The studies folder with crash-safe writes and client names kept inside it (:mod:`lib.datastore`), or a
        DICOMweb PACS listing every image series and storing labels as coded DICOM SEG (:mod:`lib.dicomweb`)."""
        if self.studies.startswith(("http://", "https://")):
            cache = monailabel_settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip() or None
            return PacsDatastore(self.studies, self.settings, self.label_names, self.service.vocabulary, cache)
        return open_datastore(
            self.studies, protected=(self.app_dir, self.settings.bundle), max_voxels=self.settings.max_voxels
        )

    def _load_sessions(self, load: bool = False) -> SafeSessions | None:
        """MONAI Label's sessions, refusing archives that would unpack outside their folder."""
        return open_sessions() if load else None

    def init_infers(self) -> dict[str, Any]:
        return {
            "medsam3_auto": AutoSegmentation(self.service, self.label_names),
            "medsam3_clicks": InteractiveSegmentation(self.service, self.label_names),
            "medsam3_vista3d": Vista3dPrompts(self.service, self.label_names),
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {"medsam3": FineTuning(self.settings, self.label_names, self.model_dir)}

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """An unknown strategy is the client's mistake: 404 with the ones there are (MONAI Label says 500)."""
        strategy = request.get("strategy") or "random"
        if not isinstance(strategy, str) or strategy not in self._strategies:
            known = sorted(self._strategies)
            raise HTTPException(404, f"No active learning strategy {strategy!r:.80}; there are {known}")
        return super().next_sample(request)

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First(), "uncertainty": Uncertainty()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        """Uncertainty scoring when ``--conf scoring_labels`` names labels (MONAI Label runs it in a subprocess
        that loads its own copy of the model, at start-up and after each submitted label)."""
        wanted = names(self.settings.scoring_labels)
        if not wanted:
            return {}
        if self.studies.startswith(("http://", "https://")):  # it would fetch every series of the PACS
            raise ValueError("--conf scoring_labels is not supported with a PACS (--studies http...): leave it out")
        return {"medsam3_uncertainty": UncertaintyScoring(self.service, list(self.service.offered_labels(wanted)))}

    def on_init_complete(self) -> None:
        """The server (not MONAI Label's training subprocess) loads the model at start-up."""
        mark_server_process()  # the training runs it starts die with it
        install_error_handlers()
        install_request_guards(self.settings)
        install_security(self.settings, self.datastore())
        if isinstance(self.datastore(), PacsDatastore):
            install_dicomweb_proxy(self.studies, self.datastore().session.auth, self.settings.dicomweb_timeout)
        self.service.load()
        warm_up_io()
        super().on_init_complete()
        logger.info(
            "Medical SAM3 (bundle %s, %s): %s", self.settings.bundle, self.settings.overrides, self.service.status
        )
