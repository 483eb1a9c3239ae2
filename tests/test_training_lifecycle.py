"""Training that stays in its lane, on a real server: a worse run is not published, and a run dies with its server.

The server serves the demo model (trained on phantoms, so the served weights have a real Dice to beat).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import DEMO_MODEL
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from monailabel_server import free_port, server_process, studies
from test_monailabel_training import ADAPTER, _wait, wait_for_training_steps

pytestmark = pytest.mark.slow

IMAGES = ("ct_ras", "ct_lps", "ct_psr")
LABEL_INFO = [{"name": "liver"}, {"name": "spleen"}]  # the phantoms' values 1 and 2


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """A server with a final label on every study, one of them cut short on disk after it was saved (a cut label is
    refused when submitted); its root folder; its process (the last test kills it)."""
    root = tmp_path_factory.mktemp("lifecycle")
    folder = studies(root)
    conf = ["--conf", "model_size", "tiny", "--conf", "checkpoint", str(DEMO_MODEL), "--conf", "labels", "liver,spleen"]
    for url, process in server_process(root, folder, free_port(), *conf, "--conf", "model_dir", str(root / "model")):
        client = MONAILabelClient(url)
        for image_id in IMAGES:
            label = root / "phantoms" / f"{image_id}_label.nii.gz"
            client.save_label(image_id, str(label), params={"label_info": LABEL_INFO})
        saved = folder / "labels" / "final" / f"{IMAGES[-1]}.nii.gz"
        saved.write_bytes(saved.read_bytes()[:100])  # damaged on disk
        cut = root / "cut.nii.gz"
        cut.write_bytes(saved.read_bytes())
        with pytest.raises(MONAILabelClientException, match="Status: 400.*Label not saved: Cannot read image"):
            client.save_label(IMAGES[0], str(cut), params={"label_info": LABEL_INFO})
        yield url, root, process


def test_a_worse_run_is_not_published(server) -> None:
    """A diverging run (huge learning rates) scores below the served demo model; the unreadable label is skipped."""
    url, root, _ = server
    client = MONAILabelClient(url)
    diverging = {"max_steps": 1, "click_rounds": 0, "validation_fraction": 0.5, "lr_backbone": 10, "lr_decoder": 10}
    client.train_start("medsam3", diverging)
    task = _wait(url)
    assert task["status"] == "DONE", task.get("details")
    assert any("not published: validation Dice" in line for line in task["details"])  # /train says why
    stats = client.info()["train_stats"]["medsam3"]
    assert stats["status"] == "finished" and stats["published"] is None, stats
    assert stats["validation_dice"] < stats["served_dice"] and stats["served_weights"].startswith("base weights")
    assert stats["publish_decision"].startswith("not published")
    assert stats["training_images"] == stats["validation_images"] == 1
    assert [entry["image"] for entry in stats["skipped_labels"]] == [IMAGES[-1]]
    assert "Cannot read image" in stats["skipped_labels"][0]["reason"]
    assert not (root / "model" / ADAPTER).exists()
    assert (Path(stats["run_dir"]) / "model_best.pt").is_file()  # the run keeps its weights


def test_training_dies_with_its_server(server) -> None:
    """kill -9 of the server: its training run exits within seconds, publishing nothing, and says why."""
    url, root, process = server
    MONAILabelClient(url).train_start("medsam3", {"max_steps": 100000, "click_rounds": 0, "validation_fraction": 0})
    wait_for_training_steps(url, timeout=120)
    runs = [p for p in psutil.Process(process.pid).children() if "monailabel.interfaces.utils.app" in p.cmdline()]
    assert len(runs) == 1
    process.kill()
    process.wait(timeout=30)
    deadline = time.time() + 10
    while runs[0].is_running() and runs[0].status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the training run outlived its server"
        time.sleep(0.2)
    stats = json.loads((root / "model" / "train_stats.json").read_text())
    assert stats["status"] == "stopped" and f"(pid {process.pid}) is gone" in stats["stopped_reason"]
    assert stats["published"] is None and not (root / "model" / ADAPTER).exists()
    assert not list((root / "model").rglob("*.tmp")) and not list((root / "model").rglob("*.partial"))
