"""The app's fine-tuning pieces without a server: trainer options, Slicer label names, publishing and hot reload,
the publish gate, run folders and the statistics of runs that stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_model
from monailabel.datastore.local import LocalDatastore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))

from lib.model_service import ModelService  # noqa: E402
from lib.published_weights import ADAPTER_FILE, FULL_FILE, PublishedWeights  # noqa: E402
from lib.settings import AppSettings  # noqa: E402
from lib.trainers.fine_tuning import STATS_FILE, FineTuning, _split  # noqa: E402
from lib.trainers.publish_gate import publish_decision  # noqa: E402
from lib.trainers.run_guard import process_identity, prune_runs  # noqa: E402

from scripts.adapters import adaptation_state_dict, configure_adaptation  # noqa: E402
from scripts.checkpoint import save_checkpoint  # noqa: E402
from scripts.phantom import write_phantom  # noqa: E402
from scripts.prompts import PromptSet  # noqa: E402

CONF = {"model_size": "tiny", "checkpoint": "random", "device": "cpu"}
SETTINGS = AppSettings.from_conf(CONF)
LABELS = {"liver": 1, "spleen": 2}


def _adapter_file(path: Path, seed: int, mode: str = "lora") -> Path:
    """An adapter file as train.json writes it, with non-zero (so visible) LoRA updates."""
    model = tiny_model()
    configure_adaptation(model, mode)
    generator = np.random.default_rng(seed)
    state = {k: v + float(generator.normal()) * 0.05 for k, v in adaptation_state_dict(model).items()}
    return save_checkpoint(model, path, state_dict=state, mode=mode, adaptation=model.adaptation)


def test_trainer_options_are_checked(tmp_path) -> None:
    trainer = FineTuning(SETTINGS, LABELS, tmp_path)
    options = trainer._options({"model": "medsam3", "gpus": "all", "max_steps": "50", "mode": "lora"})
    assert options["max_steps"] == 50 and options["mode"] == "lora" and options["continue_from_published"] is True
    assert trainer._options({"mode": ["adapter3d", "lora", "full"]})["mode"] == "adapter3d"  # Slicer's default
    assert trainer._options({"continue_from_published": "false"})["continue_from_published"] is False
    with pytest.raises(ValueError, match=r"Unknown training options \['epochs'\]"):
        trainer._options({"epochs": 3})
    with pytest.raises(ValueError, match="mode must be one of"):
        trainer._options({"mode": "qlora"})
    with pytest.raises(ValueError, match="max_steps expects a int, got 'many'"):
        trainer._options({"max_steps": "many"})
    with pytest.raises(ValueError, match="max_steps and batch_size must be >= 1"):
        trainer._options({"max_steps": 0})
    with pytest.raises(ValueError, match="max_steps expects a int, got inf"):
        trainer._options({"max_steps": float("inf")})
    with pytest.raises(ValueError, match="lr_backbone must be a finite number, got nan"):
        trainer._options({"lr_backbone": "NaN"})


def test_trainer_reads_slicer_label_names(tmp_path) -> None:
    """Voxel value i is the i-th entry of label_info (Slicer's idx is ignored); without it, the app's values."""
    studies = tmp_path / "studies"
    studies.mkdir()
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",))
    trainer = FineTuning(SETTINGS, LABELS, tmp_path / "model")
    with pytest.raises(ValueError, match="No submitted labels to train on"):
        trainer._items(datastore)
    for name in ("a", "b", "c", "d", "e"):
        image, label = write_phantom(tmp_path / "phantoms", name, shape=(16, 16, 4))
        datastore.add_image(name, str(image), {})
        info = {"a": {"label_info": [{"name": "spleen", "idx": 2}, {"name": "Background"}, {"name": "aorta"}]}}
        info["c"] = {"label_info": [{"name": "Segment_1"}, {"name": "liver"}]}
        info["d"] = {"label_info": ["liver"]}  # not Slicer's format: skipped with a warning, training goes on
        if name == "e":  # a save cut short: the file is there but unreadable
            label.write_bytes(label.read_bytes()[:100])
        datastore.save_label(name, str(label), "final", info.get(name, {}))
    elsewhere = type(
        "Pacs", (LocalDatastore,), {"get_labeled_images": lambda self, *a: ["f", *datastore.get_labeled_images()]}
    )
    found, skipped = trainer._items(elsewhere(str(studies), extensions=("*.nii.gz",)))  # "f": a PACS SEG made elsewhere
    items = {Path(item["image"]).name: item for item in found}
    assert items["a.nii.gz"]["labels"] == {"1": "spleen", "3": "aorta"}
    assert items["b.nii.gz"]["labels"] == {"1": "liver", "2": "spleen"}
    assert items["c.nii.gz"]["labels"] == {"2": "liver"}  # Slicer's default segment name is not a structure
    assert "d.nii.gz" not in items and "e.nii.gz" not in items
    assert Path(items["b.nii.gz"]["label"]).is_file()
    reasons = {entry["image"]: entry["reason"] for entry in skipped}
    assert sorted(reasons) == ["d", "e", "f"] and "label_info" in reasons["d"] and "Cannot read image" in reasons["e"]
    assert reasons["f"] == "its label was not submitted through this server"


def test_validation_split() -> None:
    assert _split(list(range(4)), 0.2) == (list(range(4)), [])  # too few images to hold one out
    training, validation = _split(list(range(10)), 0.2)
    assert len(validation) == 2 and sorted(training + validation) == list(range(10))
    assert _split(list(range(10)), 0.0) == (list(range(10)), [])


def test_published_weights_are_replaced_whole(tmp_path) -> None:
    published = PublishedWeights(tmp_path / "model")
    assert published.current() == (None, None, None)
    published.publish(_adapter_file(tmp_path / "run" / "model_final.pt", 0), "lora")
    first, adapter, full = published.current()
    assert adapter == str(tmp_path / "model" / ADAPTER_FILE) and full is None and first is not None
    published.publish(save_checkpoint(tiny_model(), tmp_path / "run" / "full.pt"), "full")
    version, adapter, full = published.current()
    assert adapter is None and full == str(tmp_path / "model" / FULL_FILE) and version != first
    assert not list((tmp_path / "model").glob("*.partial"))
    # Both present (a swap in progress): the newest is served, and the version changes when the other goes.
    published.publish(_adapter_file(tmp_path / "run" / "model_final.pt", 1), "lora")
    (tmp_path / "model" / FULL_FILE).write_bytes((tmp_path / "run" / "full.pt").read_bytes())
    both, adapter, full = published.current()
    assert full == str(tmp_path / "model" / FULL_FILE) and adapter is None
    (tmp_path / "model" / FULL_FILE).unlink()
    assert published.current()[0] != both and published.current()[1] is not None


def test_service_serves_newly_published_weights(tmp_path) -> None:
    published = PublishedWeights(tmp_path / "model")
    service = ModelService(SETTINGS, published)
    image, _ = write_phantom(tmp_path, "ct", shape=(24, 24, 6))
    prompts = PromptSet.create(texts=["liver"])

    def scores() -> tuple[float, dict]:
        _, result, summary = service.segment(str(image), prompts)
        return result.labels[0]["score"], summary

    base, summary = scores()
    assert summary["weights"]["fine_tuned"] is None and scores()[1]["encoding_cache"] == "hit"
    published.publish(_adapter_file(tmp_path / "run1.pt", seed=1), "lora")
    tuned, summary = scores()
    assert summary["weights"]["fine_tuned"] == published.current()[1] and summary["encoding_cache"] == "miss"
    assert tuned != base
    model = service._segmenter.predictor.model
    published.publish(_adapter_file(tmp_path / "run2.pt", seed=2), "lora")
    retuned, _ = scores()
    assert service._segmenter.predictor.model is model and retuned not in (base, tuned)  # loaded in place
    published.publish(_adapter_file(tmp_path / "run3.pt", seed=3, mode="adapter3d"), "adapter3d")
    scores()
    assert service._segmenter.predictor.model is not model  # another adaptation: rebuilt from the base
    assert service._segmenter.predictor.model.adaptation["mode"] == "adapter3d"
    (tmp_path / "model" / ADAPTER_FILE).write_bytes(b"truncated")  # a broken file: the base model serves
    again, summary = scores()
    assert summary["weights"]["fine_tuned"] is None and again == pytest.approx(base, abs=1e-6)
    assert "truncated" in summary["weights"]["load_errors"][0] or "Cannot read" in summary["weights"]["load_errors"][0]


def test_trainer_continues_only_from_a_fitting_adapter(tmp_path) -> None:
    trainer = FineTuning(SETTINGS, LABELS, tmp_path / "model")
    options = trainer._options({"mode": "lora"})
    assert trainer._starting_adapter(options) == ""  # nothing published yet
    model = tiny_model()
    configure_adaptation(model, "lora", heads=True)
    state = adaptation_state_dict(model)
    adapter = save_checkpoint(model, tmp_path / "run.pt", state_dict=state, mode="lora", adaptation=model.adaptation)
    published = trainer.published.publish(adapter, "lora")
    assert trainer._starting_adapter(options) == str(published)
    assert trainer._starting_adapter(trainer._options({"mode": "adapter3d"})) == ""  # another mode
    assert trainer._starting_adapter(trainer._options({"mode": "lora", "train_heads": False})) == ""
    assert trainer._starting_adapter(trainer._options({"mode": "full"})) == ""
    assert trainer._starting_adapter(trainer._options({"mode": "lora", "continue_from_published": False})) == ""
    published.write_bytes(b"broken")
    assert trainer._starting_adapter(options) == ""  # unreadable: start from the base, with a warning


def test_publish_gate_decides_on_the_dice_values() -> None:
    published, why = publish_decision(0.61, 0.60, 2)
    assert published and why == "published: validation Dice 0.6100 >= the served weights' 0.6000 on 2 images"
    assert publish_decision(0.60, 0.60, 2)[0]  # not worse is enough
    refused, why = publish_decision(0.40, 0.60, 2)
    assert not refused and "0.4000 < the served weights' 0.6000 on the same 2 images" in why and "force_publish" in why
    forced, why = publish_decision(0.40, 0.60, 2, force=True)
    assert forced and "force_publish" in why
    assert publish_decision(None, None, 0)[0] and "no validation images" in publish_decision(None, None, 0)[1]
    assert publish_decision(0.4, None, 1)[0]  # served weights that cannot be scored cannot be served either


def test_old_runs_are_pruned_and_stale_temp_files_removed(tmp_path) -> None:
    train = tmp_path / "model" / "train"
    names = ["20240101_000000", "20240102_000000", "20240102_000000_2", "20240103_000000"]
    for name in (*names, "notes"):
        (train / name).mkdir(parents=True)
    assert [d.name for d in prune_runs(train, 0)] == []  # 0 keeps all
    assert [d.name for d in prune_runs(train, 2)] == names[:2]
    assert sorted(d.name for d in train.iterdir()) == [*names[2:], "notes"]  # not a run folder: left alone
    (train / names[3] / "model_final.pt.tmp").write_bytes(b"half")
    (tmp_path / "model" / f"{ADAPTER_FILE}.12345.partial").write_bytes(b"half")
    trainer = FineTuning(AppSettings.from_conf({**CONF, "keep_runs": "2"}), LABELS, tmp_path / "model")
    first, second = trainer._new_run_dir(), trainer._new_run_dir()  # the same second: distinct folders
    assert first != second and first.is_dir() and second.is_dir()
    assert sorted(d.name for d in train.iterdir()) == sorted([first.name, second.name, "notes"])
    assert not list((tmp_path / "model").rglob("*.tmp")) and not list((tmp_path / "model").rglob("*.partial"))
    with pytest.raises(ValueError, match="keep_runs must be >= 0"):
        AppSettings.from_conf({**CONF, "keep_runs": "-1"})


def test_stats_say_a_killed_run_stopped(tmp_path) -> None:
    model_dir, run_dir = tmp_path / "model", tmp_path / "model" / "train" / "20240101_000000"
    run_dir.mkdir(parents=True)
    trainer = FineTuning(SETTINGS, LABELS, model_dir)
    pid, started = process_identity()
    running = {"status": "running", "epoch": 3, "run_dir": str(run_dir), "pid": pid, "process_started": started}
    trainer._write_stats(running)
    assert trainer.stats() == running  # this process runs: still running
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a run killed mid-way: its pid is gone
    (model_dir / STATS_FILE).write_text(json.dumps({**running, "pid": child.pid}))
    (run_dir / "train_state.pt.tmp").write_bytes(b"half")
    (model_dir / f"{ADAPTER_FILE}.{child.pid}.partial").write_bytes(b"half")
    live = model_dir / f"{ADAPTER_FILE}.{os.getpid()}.partial"  # another process writing now: kept
    live.write_bytes(b"half")
    stats = trainer.stats()
    assert stats["status"] == "stopped" and "ended before finishing" in stats["stopped_reason"]
    assert stats["epoch"] == 3 and stats["published"] is None
    assert not list(run_dir.glob("*.tmp")) and [p.name for p in model_dir.glob("*.partial")] == [live.name]
    finished = {**running, "pid": child.pid, "status": "finished"}
    (model_dir / STATS_FILE).write_text(json.dumps(finished))
    assert trainer.stats() == finished
