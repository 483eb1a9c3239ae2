"""Fine-tuning on the labels annotators submitted: the bundle's train.json, run by MONAI Label's train task.

``POST /train/medsam3`` makes MONAI Label start ``python -m monailabel.interfaces.utils.app -m train`` (a
subprocess whose output lines ``GET /train/`` reports, and which ``DELETE /train/`` kills). There this task
collects the images with a ``final`` label, writes a datalist in which every item carries its own label names
(Slicer numbers the submitted segments 1..N in the order of its ``label_info``), runs ``bundle/configs/train.json``
on it and, only when the run finishes, publishes the weights (:class:`lib.published_weights.PublishedWeights`). The
serving model loads them before its next request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from scripts.checkpoint import read_adaptation_file
from scripts.image_io import read_image
from scripts.prompts import parse_flag

from ..bundle_path import REPO_ROOT
from ..published_weights import PublishedWeights
from ..settings import AppSettings

logger = logging.getLogger(__name__)

MODES = ("adapter3d", "lora", "full")
# Options a request may set: train.json ids (defaults from train.json + the app's preset) and the app's own.
TRAIN_OPTIONS = ("mode", "max_steps", "batch_size", "lr_backbone", "lr_decoder", "click_rounds", "train_heads")
APP_OPTIONS = {"validation_fraction": 0.2, "continue_from_published": True}
APP_PRESET = REPO_ROOT / "configs" / "app_training.json"  # the app's on-site defaults over train.json
PASSED_BY_MONAI_LABEL = {"model", "gpus", "local_rank", "client_id", "bundle_path"}
STATS_FILE = "train_stats.json"
IGNORED_NAMES = {"background", ""}
SLICER_DEFAULT_NAME = re.compile(r"Segment_\d+")  # a segment nobody named: no structure to prompt for


class FineTuning(TrainTask):
    """Fine-tunes Medical SAM3 on ``labels/final`` with the bundle's ``train.json`` and publishes the result.

    The config files are ``<bundle>/configs/train.json`` then ``configs/app_training.json`` (the app's preset: 3D
    adapters, a short run), with the site's ``--conf`` overrides of ids train.json has (weights, model size, device).
    """

    def __init__(self, settings: AppSettings, label_values: dict[str, int], model_dir: Path) -> None:
        super().__init__("Fine-tune Medical SAM3 on the submitted labels (train.json with the app's preset)")
        self.settings = settings
        self.names_by_value = {value: name for name, value in label_values.items()}
        self.model_dir = model_dir
        self.published = PublishedWeights(model_dir)
        self.config_files = [str(Path(settings.bundle) / "configs" / "train.json"), str(APP_PRESET)]
        parser = ConfigParser()
        parser.read_config(self.config_files)
        self.overrides = {k: v for k, v in settings.bundle_overrides.items() if k in parser.config}
        parser.update(self.overrides)
        self.defaults = {key: parser.get_parsed_content(key) for key in (*TRAIN_OPTIONS, "model_size")}

    def config(self) -> dict[str, Any]:
        """The options Slicer shows; the default mode comes first (MONAI Label shows lists as choices)."""
        mode = self.defaults["mode"]
        options = {key: self.defaults[key] for key in TRAIN_OPTIONS if key != "mode"}
        return {"mode": [mode, *(m for m in MODES if m != mode)], **options, **APP_OPTIONS}

    def stats(self) -> dict[str, Any]:
        """The current or last run, with the keys Slicer's progress and accuracy bars read (``epoch`` counts steps)."""
        path = self.model_dir / STATS_FILE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as error:
            logger.warning("Cannot read %s: %s", path, error)
            return {}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options = self._options(request)
        training, validation = _split(self._items(datastore), options["validation_fraction"])
        run_dir = self.model_dir / "train" / time.strftime("%Y%m%d_%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
        datalist = run_dir / "datalist.json"
        datalist.write_text(json.dumps({"training": training, "validation": validation}, indent=2))
        overrides = {
            **self.overrides,
            **{key: options[key] for key in TRAIN_OPTIONS},
            "datalist": str(datalist),
            "output_dir": str(run_dir),
            "adapter_path": self._starting_adapter(options),
            "val_every": max(1, options["max_steps"] // 4) if validation else 0,
        }
        # The exact train.json overrides: a stopped run continues with them plus --resume <run>/train_state.pt.
        (run_dir / "overrides.json").write_text(json.dumps(overrides, indent=2))
        logger.info(
            "Fine-tuning (%s, %d steps) on %d labelled images, validating on %d; run folder %s",
            options["mode"],
            options["max_steps"],
            len(training),
            len(validation),
            run_dir,
        )
        workflow = ConfigWorkflow(
            config_file=self.config_files,
            meta_file=str(Path(self.settings.bundle) / "configs" / "metadata.json"),
            logging_file=False,  # MONAI Label's subprocess logging already reaches /train status
            workflow_type="train",
            **overrides,
        )
        workflow.initialize()
        validation_handler = workflow.parser.get_parsed_content("validation")
        start = time.time()
        stats = {"mode": options["mode"], "total_epochs": options["max_steps"], "run_dir": str(run_dir)}

        def progress(engine: Engine) -> None:
            best = validation_handler.best if validation_handler.best >= 0 else 0.0
            elapsed = time.time() - start
            self._write_stats({**stats, "epoch": engine.state.iteration, "best_metric": best, "total_time": elapsed})

        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, options["max_steps"] // 50)), progress)
        workflow.run()
        workflow.finalize()
        best = run_dir / "model_best.pt"
        weights = best if validation and best.is_file() else run_dir / "model_final.pt"
        published = self.published.publish(weights, options["mode"])
        result = {
            **stats,
            "epoch": options["max_steps"],
            "best_metric": max(validation_handler.best, 0.0) if validation else 0.0,
            "total_time": round(time.time() - start, 1),
            "training_images": len(training),
            "validation_images": len(validation),
            "continued_from": overrides["adapter_path"] or None,
            "published": str(published),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._write_stats(result)
        logger.info("Fine-tuning done: %s", result)
        return result

    def _write_stats(self, stats: dict[str, Any]) -> None:
        path = self.model_dir / STATS_FILE
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(stats, indent=2))
        os.replace(partial, path)  # the server reads it on every /info and /infer

    def _starting_adapter(self, options: dict[str, Any]) -> str:
        """The published adapter to continue from, when asked and when it fits this run (mode, heads, size)."""
        adapter = self.published.adapter() if options["continue_from_published"] else None
        if not adapter or options["mode"] == "full":
            return ""  # full fine-tuning starts from the base checkpoint
        try:
            config, size, _ = read_adaptation_file(adapter)
        except ValueError as error:
            logger.warning("Not continuing from %s: %s", adapter, error)
            return ""
        if (config.get("mode"), config.get("heads"), size) != (
            options["mode"],
            options["train_heads"],
            self.defaults["model_size"],
        ):
            logger.info("Starting from the base: the published adapter is %s on %s, this run %s", config, size, options)
            return ""
        return adapter

    def _options(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's options over the defaults, type-checked; unknown options are refused."""
        defaults = self.config()
        unknown = sorted(set(request) - set(defaults) - PASSED_BY_MONAI_LABEL)
        if unknown:
            raise ValueError(f"Unknown training options {unknown}; the trainer takes {sorted(defaults)}")
        options = {}
        for key, default in defaults.items():
            value = request.get(key, default)
            if isinstance(default, list):
                value = default[0] if value == default else value
                if value not in default:
                    raise ValueError(f"{key} must be one of {default}, got {value!r}")
            else:
                try:
                    value = parse_flag(value, key) if isinstance(default, bool) else type(default)(value)
                except (TypeError, ValueError, OverflowError) as error:
                    raise ValueError(f"{key} expects a {type(default).__name__}, got {value!r}") from error
            options[key] = value
        if options["max_steps"] < 1 or options["batch_size"] < 1 or not 0 <= options["validation_fraction"] < 1:
            raise ValueError("max_steps and batch_size must be >= 1 and validation_fraction in [0, 1)")
        return options

    def _items(self, datastore: Datastore) -> list[dict[str, Any]]:
        """One datalist item per image with a final label, with the names of that label's values."""
        items = []
        for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
            label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
            info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL)
            label_path = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
            # A name whose value the file lacks (an empty segment, an offered label nobody drew) is left out rather
            # than taken as "absent everywhere": the annotator may simply not have drawn it.
            present = {str(int(v)) for v in np.unique(read_image(label_path).array)}
            try:
                named = self._label_names(info.get("label_info"))
            except ValueError as error:
                logger.warning("Skipping %s: %s", image_id, error)
                continue
            labels = {v: n for v, n in named.items() if v in present}
            if not labels:
                logger.warning("Skipping %s: its label has no named structure", image_id)
                continue
            items.append({"image": datastore.get_image_uri(image_id), "label": label_path, "labels": labels})
        if not items:
            raise ValueError(
                "No submitted labels to train on: save at least one final label (Submit Label in Slicer) first"
            )
        return items

    def _label_names(self, label_info: Any) -> dict[str, str]:
        """Slicer sends ``label_info`` [{"name": ...}] with voxel value i + 1 for the i-th entry; without it the
        values are the app's own (those /info lists)."""
        if isinstance(label_info, list) and label_info:
            if not all(isinstance(entry, dict) for entry in label_info):
                raise ValueError(f"label_info must be a list of {{'name': ...}} entries, got {label_info!r}")
            named = {str(i): str(entry.get("name", "")).strip() for i, entry in enumerate(label_info, start=1)}
        else:
            named = {str(value): name for value, name in self.names_by_value.items()}
        unnamed = sorted(name for name in named.values() if SLICER_DEFAULT_NAME.fullmatch(name))
        if unnamed:
            logger.warning("Not training segments with Slicer's default names %s: rename them to structures", unnamed)
        return {
            value: name
            for value, name in named.items()
            if name.lower() not in IGNORED_NAMES and not SLICER_DEFAULT_NAME.fullmatch(name)
        }


def _split(items: list[dict[str, Any]], fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out every k-th image (k = 1 / fraction) for validation once there are enough to spare."""
    count = int(len(items) * fraction)
    if count == 0 or len(items) - count < 1:
        return items, []
    step = len(items) / count
    held = {int(i * step) for i in range(count)}
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
