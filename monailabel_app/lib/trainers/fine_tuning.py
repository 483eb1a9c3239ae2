"""Fine-tuning on the labels annotators submitted: the bundle's train.json, run by MONAI Label's train task.

``POST /train/medsam3`` makes MONAI Label start ``python -m monailabel.interfaces.utils.app -m train`` (a
subprocess whose output lines ``GET /train/`` reports, and which ``DELETE /train/`` kills). There this task
collects the images with a ``final`` label, writes a datalist in which every item carries its own label names
(Slicer numbers the submitted segments 1..N in the order of its ``label_info``), runs ``bundle/configs/train.json``
on it and, only when the run finishes and scores at least as well as the served weights on its validation images
(:mod:`.publish_gate`), publishes the weights (:class:`lib.published_weights.PublishedWeights`). The serving model
loads them before its next request. A run follows the server that started it and dies with it; a run that died or
was stopped shows as ``stopped`` in ``train_stats`` (:mod:`.run_guard`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
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
from ..label_info import names_by_value
from ..published_weights import PublishedWeights, temp_name
from ..settings import AppSettings
from .publish_gate import publish_decision, served_dice
from .run_guard import (
    RUN_NAME,
    check_server,
    follow_server,
    process_identity,
    prune_runs,
    remove_temp_files,
    run_alive,
)

logger = logging.getLogger(__name__)

MODES = ("adapter3d", "lora", "full")
# Options a request may set: train.json ids (defaults from train.json + the app's preset) and the app's own.
TRAIN_OPTIONS = ("mode", "max_steps", "batch_size", "lr_backbone", "lr_decoder", "click_rounds", "train_heads")
APP_OPTIONS = {"validation_fraction": 0.2, "continue_from_published": True, "force_publish": False}
APP_PRESET = REPO_ROOT / "configs" / "app_training.json"  # the app's on-site defaults over train.json
PASSED_BY_MONAI_LABEL = {"model", "gpus", "local_rank", "client_id", "bundle_path"}
STATS_FILE = "train_stats.json"
STOPPED_UNFINISHED = "the training process ended before finishing (DELETE /train/, killed, or its server stopped)"
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
        self.label_values = label_values
        self.model_dir = model_dir
        self.published = PublishedWeights(model_dir)
        self.config_files = [str(Path(settings.bundle) / "configs" / "train.json"), str(APP_PRESET)]
        parser = ConfigParser()
        parser.read_config(self.config_files)
        self.overrides = {k: v for k, v in settings.bundle_overrides.items() if k in parser.config}
        parser.update(self.overrides)
        self.defaults = {key: parser.get_parsed_content(key) for key in (*TRAIN_OPTIONS, "model_size")}
        self._stats_lock = threading.Lock()  # the training loop and the server watch both write the statistics
        self._latest: dict[str, Any] = {}

    def config(self) -> dict[str, Any]:
        """The options Slicer shows; the default mode comes first (MONAI Label shows lists as choices)."""
        mode = self.defaults["mode"]
        options = {key: self.defaults[key] for key in TRAIN_OPTIONS if key != "mode"}
        return {"mode": [mode, *(m for m in MODES if m != mode)], **options, **APP_OPTIONS}

    def stats(self) -> dict[str, Any]:
        """The current or last run, with the keys Slicer's progress and accuracy bars read (``epoch`` counts steps).

        A run whose process is gone while it says "running" (killed by ``DELETE /train/``, a crash, or its server's
        death) is reported ``stopped``, and what its interrupted writes left is removed.
        """
        path = self.model_dir / STATS_FILE
        try:
            stats = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as error:
            logger.warning("Cannot read %s: %s", path, error)
            return {}
        if "pid" not in stats or run_alive(stats["pid"], stats.get("process_started", 0.0)):
            return stats
        remove_temp_files(self.model_dir, owner=stats["pid"])
        if stats.get("run_dir"):
            remove_temp_files(Path(stats["run_dir"]))
        if stats.get("status") != "running":
            return stats
        return {**stats, "status": "stopped", "stopped_reason": STOPPED_UNFINISHED, "published": None}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options = self._options(request)
        items, skipped = self._items(datastore)
        training, validation = _split(items, options["validation_fraction"])
        run_dir = self._new_run_dir()
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
        pid, started = process_identity()
        stats = {
            "status": "running",
            "mode": options["mode"],
            "total_epochs": options["max_steps"],
            "epoch": 0,
            "best_metric": 0.0,
            "run_dir": str(run_dir),
            "pid": pid,
            "process_started": started,
            "training_images": len(training),
            "validation_images": len(validation),
            "skipped_labels": skipped,
            "continued_from": overrides["adapter_path"] or None,
        }
        self._write_stats(stats)
        follow_server(lambda reason: self._server_gone(reason, run_dir))
        try:
            return self._train(options, overrides, stats)
        except Exception as error:
            self._write_stats({**self._latest, "status": "failed", "error": str(error) or type(error).__name__})
            raise

    def _train(self, options: dict[str, Any], overrides: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
        """Score the served weights, run train.json, then publish if the run is not worse (or asked to)."""
        validating = stats["validation_images"] > 0
        if validating and not options["force_publish"]:
            served, which = self._served_dice(overrides)
            stats.update(served_dice=served, served_weights=which)
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

        def progress(engine: Engine) -> None:
            best = validation_handler.best if validation_handler.best >= 0 else 0.0
            elapsed = time.time() - start
            self._write_stats({**stats, "epoch": engine.state.iteration, "best_metric": best, "total_time": elapsed})

        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, options["max_steps"] // 50)), progress)
        workflow.run()
        workflow.finalize()
        run_dir = Path(stats["run_dir"])
        run_dice = validation_handler.best if validating and validation_handler.best >= 0 else None
        publish, why = publish_decision(
            run_dice, stats.get("served_dice"), stats["validation_images"], options["force_publish"]
        )
        best = run_dir / "model_best.pt"
        weights = best if validating and best.is_file() else run_dir / "model_final.pt"
        published = None
        if publish:
            check_server(lambda reason: self._server_gone(reason, run_dir))
            published = str(self.published.publish(weights, options["mode"]))
        logger.log(logging.INFO if publish else logging.WARNING, "Weights %s %s", weights, why)
        result = {
            **stats,
            "status": "finished",
            "epoch": options["max_steps"],
            "best_metric": run_dice or 0.0,
            "total_time": round(time.time() - start, 1),
            "validation_dice": run_dice,
            "publish_decision": why,
            "published": published,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._write_stats(result)
        logger.info("Fine-tuning done: %s", result)
        return result

    def _served_dice(self, overrides: dict[str, Any]) -> tuple[float | None, str]:
        """The served weights' validation Dice and which weights they are; None when they cannot be scored (the
        server cannot load them either, so it serves the base weights)."""
        try:
            score, weights = served_dice(self.config_files, overrides, self.published)
        except Exception as error:  # noqa: BLE001 - scoring the served weights must not stop the run
            logger.warning("Cannot score the served weights on the validation images: %s", error)
            return None, f"cannot be scored: {error}"
        logger.info("Served weights (%s): validation Dice %.4f", weights, score)
        return score, weights

    def _server_gone(self, reason: str, run_dir: Path) -> None:
        """What the run leaves when its server is gone: statistics that say so, no temporary files."""
        self._write_stats({**self._latest, "status": "stopped", "stopped_reason": reason, "published": None})
        remove_temp_files(run_dir)

    def _new_run_dir(self) -> Path:
        """A new run folder, after removing what killed runs left (MONAI Label runs one training at a time, so none
        writes now) and all but the newest ``keep_runs`` runs."""
        train_dir = self.model_dir / "train"
        remove_temp_files(self.model_dir)
        for folder in train_dir.glob("*") if train_dir.is_dir() else ():
            if RUN_NAME.fullmatch(folder.name):
                remove_temp_files(folder)
        name = time.strftime("%Y%m%d_%H%M%S")
        run_dir, count = train_dir / name, 1
        while run_dir.exists():  # two runs in one second
            count += 1
            run_dir = train_dir / f"{name}_{count}"
        run_dir.mkdir(parents=True)
        prune_runs(train_dir, self.settings.keep_runs)
        return run_dir

    def _write_stats(self, stats: dict[str, Any]) -> None:
        path = self.model_dir / STATS_FILE
        with self._stats_lock:
            self._latest = stats
            partial = temp_name(path)
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
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{key} must be a finite number, got {value!r}")
            options[key] = value
        if options["max_steps"] < 1 or options["batch_size"] < 1 or not 0 <= options["validation_fraction"] < 1:
            raise ValueError("max_steps and batch_size must be >= 1 and validation_fraction in [0, 1)")
        return options

    def _items(self, datastore: Datastore) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """One datalist item per image with a final label, with the names of that label's values; and the images
        left out, with why (an unreadable label file, no named structure), so one bad save does not stop training."""
        items, skipped = [], []
        for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
            label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
            if not label_id:  # a PACS SEG made elsewhere: no label_info to say what its values are
                skipped.append({"image": image_id, "reason": "its label was not submitted through this server"})
                logger.warning("Skipping %s: its label was not submitted through this server", image_id)
                continue
            info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL)
            label_path = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
            try:
                named = self._label_names(info.get("label_info"))
                # A name whose value the file lacks (an empty segment, an offered label nobody drew) is left out
                # rather than taken as "absent everywhere": the annotator may simply not have drawn it.
                present = {str(int(v)) for v in np.unique(read_image(label_path).array)}
            except ValueError as error:
                skipped.append({"image": image_id, "reason": str(error)})
                logger.warning("Skipping %s: %s", image_id, error)
                continue
            labels = {v: n for v, n in named.items() if v in present}
            if not labels:
                skipped.append({"image": image_id, "reason": "its label has no named structure"})
                logger.warning("Skipping %s: its label has no named structure", image_id)
                continue
            items.append({"image": datastore.get_image_uri(image_id), "label": label_path, "labels": labels})
        if not items:
            raise ValueError(
                "No submitted labels to train on: save at least one final label (Submit Label in Slicer) first"
                + (f"; skipped: {skipped}" if skipped else "")
            )
        return items, skipped

    def _label_names(self, label_info: Any) -> dict[str, str]:
        """The structures a submitted label holds, ``{voxel value: name}`` (:mod:`lib.label_info`), without
        background and Slicer's default segment names."""
        named = {str(value): name for value, name in names_by_value(label_info, self.label_values).items()}
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
