"""One loaded model shared by every infer task: weights, predictor, encoding cache and a lock around the GPU.

The model loads on first use (the server loads it at start-up; MONAI Label's training and scoring subprocesses
only when they need it). Weights the trainer publishes (:mod:`lib.trainers.fine_tuning`) are picked up before
the next request: an adapter file of the current adaptation loads in place, anything else rebuilds the model,
and the encoding cache is cleared because encodings depend on the weights.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from scripts.checkpoint import file_if_present, load_adaptation_file, load_network
from scripts.encoding_cache import EncodingCache, image_key
from scripts.image_io import ImageVolume, read_image, write_label
from scripts.inference import SegmentationResult, VolumeSegmenter
from scripts.model_builder import MedSam3, build_medsam3
from scripts.predictor import Medsam3Predictor
from scripts.prompts import PromptSet
from scripts.vocabulary import Vocabulary, load_vocabulary

from .published_weights import PublishedWeights
from .settings import AppSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
IMAGES_KEPT = 4  # images kept in memory after reading (keyed by path and modification time)


class ModelNotReady(RuntimeError):
    """The model cannot serve requests; the message says why and what to do."""


class ModelService:
    """Loads the model once (at start-up when its weights are present) and serialises inference on it."""

    def __init__(self, settings: AppSettings, published: PublishedWeights) -> None:
        self.settings = settings
        self.published = published
        self.vocabulary: Vocabulary = load_vocabulary(settings.vocabulary)
        self.cache = EncodingCache(settings.cache_mb * 2**20)
        self._segmenter: VolumeSegmenter | None = None
        self._error: str | None = settings.missing_weights()
        self._lock = threading.RLock()
        self._images: OrderedDict[tuple, ImageVolume] = OrderedDict()
        self._loaded_version: tuple | None = None  # the published weights the model holds
        self.weights: dict[str, Any] = {}  # what is loaded, for /info and responses
        if self._error is not None:
            logger.error("Medical SAM3 is not ready: %s", self._error)

    def load(self) -> None:
        """Load the model if it is not yet (the server does at start-up), then any newly published weights."""
        with self._lock:
            if self._error is not None:
                return
            version, adapter, full = self.published.current()
            if self._segmenter is not None and version == self._loaded_version:
                return
            self._loaded_version = version  # a file that fails to load is not retried until it changes
            if self._segmenter is not None and adapter and self._reload_adapter(adapter):
                return
            self._load(adapter, full)

    def _load(self, adapter: str | None, full: str | None) -> None:
        """Build the model with the published weights, else the base; a failure keeps what is being served."""
        base = self.settings.checkpoint
        attempts = [(full or base, adapter, full or adapter)] if adapter or full else []
        errors = []
        for checkpoint, adapter_file, fine_tuned in [*attempts, (base, None, None)]:
            try:
                network = self._build(checkpoint, adapter_file)
            except Exception as error:  # noqa: BLE001 - a bad file or out-of-memory must not take the server down
                logger.error("Cannot load the Medical SAM3 weights %s: %s", fine_tuned or checkpoint, error)
                errors.append(f"{fine_tuned or checkpoint}: {error}")
                continue
            self._install(network, fine_tuned)
            if errors:
                self.weights["load_errors"] = errors
            return
        if self._segmenter is None:
            self._error = f"cannot load the model: {errors[-1]}"
        else:
            self.weights["load_errors"] = errors  # still serving the previous weights

    def _build(self, checkpoint: str, adapter: str | None) -> MedSam3:
        settings = self.settings
        network = build_medsam3(settings.model_size, device=settings.device)
        tracker = "" if settings.random_weights else file_if_present(settings.tracker_checkpoint)
        return load_network(network, checkpoint, tracker, adapter)

    def _reload_adapter(self, adapter: str) -> bool:
        """Load a newly published adapter into the served model in place (an unadapted model gets its adaptation).

        The file is read once; another adaptation than the model's, or a bad file, is refused before the model is
        touched, and the caller rebuilds.
        """
        model = self._segmenter.predictor.model
        try:
            load_adaptation_file(model, adapter)
        except ValueError as error:
            logger.info("Rebuilding the model for %s: %s", adapter, error)
            return False
        self._install(model, adapter)
        return True

    def _install(self, network: MedSam3, fine_tuned: str | None) -> None:
        predictor = Medsam3Predictor(
            network,
            batch_size=self.settings.batch_size,
            score_threshold=self.settings.score_threshold,
            max_empty_slices=self.settings.max_empty_slices,
        )
        self.cache.clear()  # encodings of the previous weights
        self._segmenter = VolumeSegmenter(predictor, self.vocabulary, plane=self.settings.plane, cache=self.cache)
        self.weights = {"base": self.settings.checkpoint, "fine_tuned": fine_tuned, "loaded": time.strftime("%c")}
        logger.info("Medical SAM3 weights: %s", self.weights)

    @property
    def ready(self) -> bool:
        """Whether requests can be served; loads the model on first use (MONAI Label's subprocesses)."""
        if self._segmenter is None and self._error is None:
            self.load()
        return self._segmenter is not None

    @property
    def status(self) -> str:
        return "ready" if self.ready else f"not ready: {self._error}"

    @property
    def interactive(self) -> bool:
        return self.ready and bool(getattr(self._segmenter.predictor.model, "interactive", True))

    def offered_labels(self, names: list[str] | None = None) -> dict[str, int]:
        """``{name: value}`` of the labels the tasks offer (``names`` or the whole vocabulary), numbered 1..N.

        Slicer maps voxel value v to the v-th name and OHIF to the model's label index, so values are
        contiguous from 1 whatever the vocabulary indices are; unknown names are refused at start-up.
        """
        entries = [self.vocabulary.resolve(n) for n in names] if names else list(self.vocabulary)
        unknown = [e.name for e in entries if not getattr(e, "known", True)]
        if unknown:
            raise ValueError(f"--conf labels names labels that are not in the vocabulary: {unknown}")
        return {name: value for value, name in enumerate(dict.fromkeys(e.name for e in entries), start=1)}

    def _read(self, image_path: str) -> ImageVolume:
        """Read an image, reusing the last few: clicks on one image should not re-read a 300-slice CT each time."""
        key = image_key(image_path)
        with self._lock:
            volume = self._images.get(key)
            if volume is not None:
                self._images.move_to_end(key)
                return volume
        volume = read_image(image_path)
        with self._lock:
            self._images[key] = volume
            while len(self._images) > IMAGES_KEPT:
                self._images.popitem(last=False)
        return volume

    def run(self, work: Callable[[VolumeSegmenter], T]) -> T:
        """Run ``work`` with the segmenter, holding the model lock (scoring, background jobs)."""
        with self._lock:
            self.load()  # newly published fine-tuned weights, if any
            if not self.ready:
                raise ModelNotReady(f"Medical SAM3 is {self.status}")
            return work(self._segmenter)

    def segment(self, image_path: str, prompts: PromptSet) -> tuple[ImageVolume, SegmentationResult, dict[str, Any]]:
        """Segment a datastore image; returns the image, the result and a summary with per-stage timings."""
        if not self.ready:
            raise ModelNotReady(f"Medical SAM3 is {self.status}")
        start = time.perf_counter()
        volume = self._read(image_path)
        read_s = time.perf_counter() - start
        with self._lock:  # one request at a time on the model; the encoding cache is shared
            self.load()  # newly published fine-tuned weights, if any
            hits = self.cache.hits
            result = self._segmenter.segment(volume, prompts)
            cache_hit = self.cache.hits > hits
        timings = {"io_read": round(read_s, 4), **result.timings}
        return (
            volume,
            result,
            {
                **result.summary(),
                "timings": timings,
                "encoding_cache": "hit" if cache_hit else "miss",
                "weights": self.weights,
            },
        )


def write_result(label: np.ndarray, volume: ImageVolume, extension: str, dtype: str | None, compress: bool) -> str:
    """Write a result label map to a temporary file the server sends back (and then deletes)."""
    if extension not in RESULT_EXTENSIONS:
        raise ValueError(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {extension!r}")
    # A folder of our own: a client on the same machine saves its copy under the same name in the temp folder,
    # and the server deletes its file once sent.
    folder = Path(tempfile.gettempdir()) / "medsam3_results"
    folder.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=extension, dir=folder, delete=False) as handle:
        path = handle.name
    write_label(label, volume, path, dtype=dtype or None, compress=compress)
    return path


def warm_up_io() -> None:
    """ITK loads its NRRD/DICOM modules lazily (about 2 s): pay that at start-up, not on the first click."""
    with tempfile.TemporaryDirectory() as folder:
        reference = ImageVolume.from_affine(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))
        read_image(write_label(np.zeros((2, 2, 2), dtype=np.uint8), reference, Path(folder) / "warm_up.nrrd"))
