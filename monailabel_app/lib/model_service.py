"""One loaded model shared by every infer task: the bundle's inferer, the encoding cache and a lock around the GPU.

The pipeline is the bundle's: ``configs/inference.json`` parsed by MONAI's ``ConfigParser`` with the site's
``--conf`` overrides, its ``inferer`` taken by id, as MONAI Label's bundle apps do.

The model loads on first use (the server loads it at start-up; MONAI Label's training and scoring subprocesses
only when they need it). Weights the trainer publishes (:mod:`lib.trainers.fine_tuning`) are picked up before
the next request: an adapter file of the current adaptation loads in place, anything else rebuilds the model,
and the encoding cache is cleared because encodings depend on the weights.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from monai.bundle import ConfigParser

from scripts.checkpoint import RANDOM_WEIGHTS, load_adaptation_file
from scripts.dicom_seg import SegmentInfo, write_seg
from scripts.encoding_cache import EncodingCache, image_key
from scripts.image_io import ImageVolume, read_image
from scripts.image_writing import write_label
from scripts.inference import SegmentationResult, VolumeSegmenter
from scripts.intensity import guess_modality
from scripts.label_numbering import client_values
from scripts.model_builder import BUILDERS
from scripts.network import MedSam3
from scripts.prompts import PromptSet
from scripts.vocabulary import Vocabulary

from .published_weights import PublishedWeights
from .settings import AppSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".dcm")  # .dcm: a DICOM SEG, for images from a DICOM series
IMAGES_KEPT = 4  # images kept in memory after reading (keyed by path and modification time)
IMAGE_BYTES_KEPT = 2**30  # ... and at most this many bytes of them


class ModelNotReady(RuntimeError):
    """The model cannot serve requests; the message says why and what to do."""


class ModelService:
    """Serves the bundle's own ``inferer`` (``configs/inference.json``, with the site's ``--conf`` overrides).

    The model loads once (at start-up when its weights are present) and inference on it is serialised.
    """

    def __init__(self, settings: AppSettings, published: PublishedWeights) -> None:
        self.settings = settings
        self.published = published
        self.config_file = Path(settings.bundle) / "configs" / "inference.json"
        parser = self._parser()
        model_size = parser.get_parsed_content("model_size")
        if model_size not in BUILDERS:  # refused at start-up, not at the first request
            raise ValueError(f"--conf model_size must be one of {sorted(BUILDERS)}, got {model_size!r}")
        self.vocabulary: Vocabulary = parser.get_parsed_content("vocabulary")
        self.base_checkpoint = str(parser.get_parsed_content("ckpt_path"))
        self.cache = EncodingCache(settings.cache_mb * 2**20)
        self._segmenter: VolumeSegmenter | None = None
        self._error: str | None = self._missing_weights()
        self._lock = threading.RLock()
        self._images: OrderedDict[tuple, ImageVolume] = OrderedDict()
        self._loaded_version: tuple | None = None  # the published weights the model holds
        self.weights: dict[str, Any] = {}  # what is loaded, for /info and responses
        if self._error is not None:
            logger.error("Medical SAM3 is not ready: %s", self._error)

    def _parser(self, **overrides: Any) -> ConfigParser:
        """The bundle's inference config with the site's overrides, then ``overrides`` (weights to load)."""
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update({**self.settings.bundle_overrides, **overrides})
        return parser

    def _missing_weights(self) -> str | None:
        """Why the model cannot be served, or None when its weights are in place."""
        if self.base_checkpoint == RANDOM_WEIGHTS or Path(self.base_checkpoint).is_file():
            return None
        return (
            f"weights not found at {self.base_checkpoint}: put the Medical SAM3 checkpoint there "
            "(see bundle/docs/README.md) or start with --conf ckpt_path <file>"
        )

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
        """Build the bundle's inferer with the published weights, else the base; a failure keeps what is served."""
        published = {"ckpt_path": full} if full else {"adapter_path": adapter} if adapter else None
        attempts = [published, {}] if published else [{}]
        errors = []
        for weights in attempts:
            fine_tuned = weights.get("ckpt_path") or weights.get("adapter_path")
            try:
                segmenter = self._inferer(self._parser(**weights))
            except Exception as error:  # noqa: BLE001 - a bad file or out-of-memory must not take the server down
                cause = _root_cause(error)
                logger.error("Cannot load the Medical SAM3 weights %s: %s", fine_tuned or "(base)", cause)
                errors.append(f"{fine_tuned or 'base weights'}: {cause}")
                continue
            self._install(segmenter, fine_tuned)
            if errors:
                self.weights["load_errors"] = errors
            return
        if self._segmenter is None:
            self._error = f"cannot load the model: {errors[-1]}"
        else:
            self.weights["load_errors"] = errors  # still serving the previous weights

    def _inferer(self, parser: ConfigParser, network: MedSam3 | None = None) -> VolumeSegmenter:
        """The config's ``inferer``, with this server's encoding cache and no progress bars; ``network``, when
        given, replaces the config's (an adapter loaded in place)."""
        if network is not None:
            parser["network"] = network
        parser["predictor#progress"] = False
        parser["inferer#cache"] = self.cache
        return parser.get_parsed_content("inferer", lazy=False)

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
        self._install(self._inferer(self._parser(), network=model), adapter)
        return True

    def _install(self, segmenter: VolumeSegmenter, fine_tuned: str | None) -> None:
        self.cache.clear()  # encodings of the previous weights
        self._segmenter = segmenter
        self.weights = {"base": self.base_checkpoint, "fine_tuned": fine_tuned, "loaded": time.strftime("%c")}
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
        """``{name: 1..N}`` the tasks offer (``--conf labels``, default the whole vocabulary), for Slicer and OHIF."""
        return client_values(self.vocabulary, names)

    def _read(self, image_path: str) -> ImageVolume:
        """Read an image, reusing the last few: clicks on one image should not re-read a 300-slice CT each time."""
        key = image_key(image_path)
        with self._lock:
            volume = self._images.get(key)
            if volume is not None:
                self._images.move_to_end(key)
                return volume
        volume = read_image(image_path, max_voxels=self.settings.max_voxels)
        with self._lock:
            self._images[key] = volume
            while len(self._images) > IMAGES_KEPT or sum(v.array.nbytes for v in self._images.values()) > (
                IMAGE_BYTES_KEPT
            ):
                self._images.popitem(last=False)
        return volume

    def modality(self, image_path: str) -> str:
        """ "CT" or "MR" as the intensities suggest (for files without DICOM tags)."""
        return guess_modality(self._read(image_path).array)

    def check_limits(self, prompts: PromptSet) -> None:
        """Refuse requests bigger than the site allows (``--conf max_prompts``, ``max_points``) before any work."""
        for what, count, option in (
            ("text prompts", len(prompts.texts), "max_prompts"),
            ("clicks", len(prompts.points), "max_points"),
        ):
            limit = getattr(self.settings, option)
            if count > limit:
                raise ValueError(f"{count} {what} in one request; this server takes at most {limit} (--conf {option})")

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
        self.check_limits(prompts)
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


def _root_cause(error: BaseException) -> BaseException:
    """The error that says what is wrong: MONAI's config parser wraps it in "Failed to evaluate ..." errors."""
    while isinstance(error, RuntimeError) and str(error).startswith("Failed to ") and error.__cause__ is not None:
        error = error.__cause__
    return error


def write_result(
    label: np.ndarray,
    volume: ImageVolume,
    extension: str,
    dtype: str | None,
    compress: bool,
    seg: tuple[Path | None, list[SegmentInfo]] = (None, []),
) -> str:
    """Write a result label map to a temporary file the server sends back (and then deletes); for ``.dcm`` a DICOM
    SEG referencing ``seg``'s series folder, with its segments' names and codes."""
    if extension not in RESULT_EXTENSIONS:
        raise ValueError(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {extension!r}")
    series, segments = seg
    if extension == ".dcm" and series is None:
        raise ValueError("result_extension .dcm (DICOM SEG) needs an image from a DICOM series: a PACS or a folder")
    with tempfile.NamedTemporaryFile(suffix=extension, dir=results_folder(), delete=False) as handle:
        path = handle.name
    try:
        if extension == ".dcm":
            if not label.any():
                raise ValueError("Nothing was segmented, and a DICOM SEG needs at least one segment")
            write_seg(label, volume, series, segments, path)
        else:
            write_label(label, volume, path, dtype=dtype or None, compress=compress)
    except BaseException:
        os.unlink(path)
        raise
    return path


def results_folder() -> Path:
    """Where result files wait to be sent (the server deletes each once sent): a folder of our own, since a client
    on the same machine saves its copy under the same name in the temp folder. ``medsam3_results`` there when this
    account owns it and no one else may write in it; otherwise (another account's server made it first) a private
    folder of this process."""
    shared = Path(tempfile.gettempdir()) / "medsam3_results"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        found = shared.lstat()
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid() and not found.st_mode & 0o022:
            return shared
    except OSError as error:
        logger.debug("Cannot use %s: %s", shared, error)
    private = _private_results_folder()
    private.mkdir(mode=0o700, exist_ok=True)  # again, should a temp-folder clean-up have removed it
    return private


@functools.cache
def _private_results_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="medsam3_results_"))
    logger.warning("The temp folder's medsam3_results belongs to another account: results wait in %s", folder)
    return folder


def warm_up_io() -> None:
    """ITK loads its NRRD/DICOM modules lazily (about 2 s): pay that at start-up, not on the first click."""
    with tempfile.TemporaryDirectory() as folder:
        reference = ImageVolume.from_affine(np.zeros((2, 2, 2), dtype=np.int16), np.eye(4))
        read_image(write_label(np.zeros((2, 2, 2), dtype=np.uint8), reference, Path(folder) / "warm_up.nrrd"))
