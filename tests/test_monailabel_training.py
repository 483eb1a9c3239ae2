"""Active learning end to end: labels submitted as Slicer does, POST /train, hot reload of the new weights, stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel_server import start_server

from scripts.image_io import read_image
from scripts.image_writing import write_label

pytestmark = pytest.mark.slow

ADAPTER = "medsam3_finetuned_adapter.pt"
AUTO = {"labels": "liver, spleen", "result_extension": ".nii.gz"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("training")
    conf = ["--conf", "model_size", "tiny", "--conf", "checkpoint", "random", "--conf", "labels", "liver,spleen"]
    yield from start_server(root, *conf, "--conf", "model_dir", str(root / "model"))


@pytest.fixture(scope="module")
def client(server) -> MONAILabelClient:
    return MONAILabelClient(server[0])


def _wait(url: str, timeout: float = 600) -> dict:
    """The training task once it has left RUNNING (or SUBMITTED)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{url}/train/", timeout=30).json()
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(2)
    raise AssertionError(f"training did not finish in {timeout} s")


def wait_for_training_steps(url: str, timeout: float) -> None:
    """Until the running training task has logged its first steps."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{url}/train/", timeout=30).json()
        if any("train_loss" in line for line in task.get("details", [])):
            return
        assert task.get("status") in ("SUBMITTED", "RUNNING"), task
        time.sleep(1)
    raise AssertionError(f"training logged no step in {timeout} s")


def _submit_slicer_label(client: MONAILabelClient, root: Path, image_id: str, tmp_path: Path) -> None:
    """Slicer numbers the submitted segments 1..N in the order of label_info: spleen first here."""
    phantom = read_image(root / "phantoms" / f"{image_id}_label.nii.gz")
    slicer = np.zeros(phantom.array.shape, np.uint8)
    slicer[phantom.array == 2] = 1  # spleen
    slicer[phantom.array == 1] = 2  # liver
    path = write_label(slicer, phantom, tmp_path / f"{image_id}.nii.gz")
    label_info = [{"name": "spleen", "idx": 2}, {"name": "liver", "idx": 1}]  # idx: Slicer's, not the voxel value
    client.save_label(image_id, str(path), params={"label_info": label_info})


def _scores(client: MONAILabelClient) -> tuple[list[float], dict]:
    _, result = client.infer("medsam3_auto", "ct_lps", AUTO)
    return [row["score"] for row in result["labels"]], result


def test_train_without_labels_says_why(server, client) -> None:
    client.train_start("medsam3", {"max_steps": 2})
    task = _wait(server[0])
    assert task["status"] == "ERROR" and any("No submitted labels" in line for line in task["details"])
    response = requests.post(f"{server[0]}/train/medsam3", json={"max_step": 2}, timeout=30)
    assert response.status_code == 200  # MONAI Label accepts the job; the task refuses the option by name
    task = _wait(server[0])
    assert task["status"] == "ERROR" and any("Unknown training options" in line for line in task["details"])


def test_train_publishes_weights_the_server_then_serves(server, client, tmp_path) -> None:
    url, studies = server
    info = client.info()
    assert info["trainers"]["medsam3"]["config"]["mode"] == ["adapter3d", "lora", "full"]
    before, first = _scores(client)
    assert first["weights"]["fine_tuned"] is None
    for image_id in ("ct_ras", "ct_psr"):
        _submit_slicer_label(client, studies.parent, image_id, tmp_path)
    client.train_start("medsam3", {"max_steps": 4, "click_rounds": 1, "lr_backbone": 0.01})
    task = _wait(url)
    assert task["status"] == "DONE", task.get("details")
    assert any("train_loss" in line for line in task["details"])  # progress reaches /train status
    published = studies.parent / "model" / ADAPTER
    assert published.is_file()
    stats = client.info()["train_stats"]["medsam3"]
    assert stats["mode"] == "adapter3d" and stats["training_images"] == 2 and stats["published"] == str(published)
    assert stats["epoch"] == stats["total_epochs"] == 4 and stats["best_metric"] == 0.0  # Slicer's progress bar keys
    assert stats["status"] == "finished" and "no validation images" in stats["publish_decision"]
    assert (Path(stats["run_dir"]) / "overrides.json").is_file()
    after, second = _scores(client)  # no restart: the next request loads the published adapter
    assert second["weights"]["fine_tuned"] == str(published) and second["encoding_cache"] == "miss"
    assert after != before  # new weights, new scores
    datalist = Path(stats["run_dir"]) / "datalist.json"
    assert '"1": "spleen"' in datalist.read_text() and '"2": "liver"' in datalist.read_text()


def test_stopping_training_keeps_the_served_weights(server, client) -> None:
    url, studies = server
    published = studies.parent / "model" / ADAPTER
    stamp = published.stat().st_mtime_ns if published.exists() else None
    before, _ = _scores(client)
    client.train_start("medsam3", {"max_steps": 100000, "click_rounds": 1})
    wait_for_training_steps(url, timeout=300)
    stopped = client.train_stop()
    assert stopped["status"] == "STOPPED"
    deadline = time.time() + 10  # the killed process may take a moment to go
    while (stats := client.info()["train_stats"]["medsam3"])["status"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert stats["status"] == "stopped" and "ended before finishing" in stats["stopped_reason"], stats
    assert not list(Path(stats["run_dir"]).glob("*.tmp"))
    assert (published.stat().st_mtime_ns if published.exists() else None) == stamp
    after, result = _scores(client)
    assert after == before and result["encoding_cache"] == "hit"
