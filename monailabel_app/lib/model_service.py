"""One loaded model shared by every infer task: weights, predictor, encoding cache and a lock around the GPU."""

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

from scripts.checkpoint import file_if_present, load_network
from scripts.encoding_cache import EncodingCache, image_key
from scripts.image_io import ImageVolume, read_image, write_label
from scripts.inference import SegmentationResult, VolumeSegmenter
from scripts.model_builder import build_medsam3
from scripts.predictor import Medsam3Predictor
from scripts.prompts import PromptSet
from scripts.vocabulary import Vocabulary, load_vocabulary

from .settings import AppSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
IMAGES_KEPT = 4  # images kept in memory after reading (keyed by path and modification time)


class ModelNotReady(RuntimeError):
    """The model cannot serve requests; the message says why and what to do."""


class ModelService:
    """Loads the model once (at start-up when its weights are present) and serialises inference on it."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.vocabulary: Vocabulary = load_vocabulary(settings.vocabulary)
        self.cache = EncodingCache(settings.cache_mb * 2**20)
        self._segmenter: VolumeSegmenter | None = None
        self._error: str | None = settings.missing_weights()
        self._lock = threading.Lock()
        self._images: OrderedDict[tuple, ImageVolume] = OrderedDict()
        if self._error is None:
            self._load()
            _warm_up_io()
        else:
            logger.error("Medical SAM3 is not ready: %s", self._error)

    def _load(self) -> None:
        settings = self.settings
        try:
            network = build_medsam3(settings.model_size, device=settings.device)
            tracker = "" if settings.random_weights else file_if_present(settings.tracker_checkpoint)
            network = load_network(network, settings.checkpoint, tracker)
        except (ValueError, OSError) as error:
            self._error = f"cannot load the model: {error}"
            logger.error("Medical SAM3 is not ready: %s", self._error)
            return
        predictor = Medsam3Predictor(
            network,
            batch_size=settings.batch_size,
            score_threshold=settings.score_threshold,
            max_empty_slices=settings.max_empty_slices,
        )
        self._segmenter = VolumeSegmenter(predictor, self.vocabulary, plane=settings.plane, cache=self.cache)

    @property
    def ready(self) -> bool:
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
        if not self.ready:
            raise ModelNotReady(f"Medical SAM3 is {self.status}")
        with self._lock:
            return work(self._segmenter)

    def segment(self, image_path: str, prompts: PromptSet) -> tuple[ImageVolume, SegmentationResult, dict[str, Any]]:
        """Segment a datastore image; returns the image, the result and a summary with per-stage timings."""
        if not self.ready:
            raise ModelNotReady(f"Medical SAM3 is {self.status}")
        start = time.perf_counter()
        volume = self._read(image_path)
        read_s = time.perf_counter() - start
        with self._lock:  # one request at a time on the model; the encoding cache is shared
            hits = self.cache.hits
            result = self._segmenter.segment(volume, prompts)
            cache_hit = self.cache.hits > hits
        timings = {"io_read": round(read_s, 4), **result.timings}
        return (
            volume,
            result,
            {**result.summary(), "timings": timings, "encoding_cache": "hit" if cache_hit else "miss"},
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


def _warm_up_io() -> None:
    """ITK loads its NRRD/DICOM modules lazily (about 2 s): pay that at start-up, not on the first click."""
    with tempfile.TemporaryDirectory() as folder:
        reference = ImageVolume.from_affine(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))
        read_image(write_label(np.zeros((2, 2, 2), dtype=np.uint8), reference, Path(folder) / "warm_up.nrrd"))
