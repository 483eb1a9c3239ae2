"""The MONAI Label app end to end: a real server on 127.0.0.1, driven with the client the Slicer plugin uses."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from monailabel_server import start_server

from scripts.image_io import read_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    conf = [
        "--conf",
        "model_size",
        "tiny",
        "--conf",
        "checkpoint",
        "random",
        "--conf",
        "scoring_labels",
        "liver,spleen",
    ]
    yield from start_server(tmp_path_factory.mktemp("server"), *conf)


@pytest.fixture(scope="module")
def client(server) -> MONAILabelClient:
    return MONAILabelClient(server[0])


# Slicer plugin payloads: the model's config defaults plus these keys.
SLICER_AUTO = {"text": "", "labels": "", "result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}


def _assert_same_grid(result_file: str, image: Path) -> np.ndarray:
    out, ref = read_image(result_file), read_image(image)
    assert out.array.shape == ref.array.shape
    np.testing.assert_allclose(out.direction, ref.direction, atol=1e-5)
    np.testing.assert_allclose(out.origin, ref.origin, atol=1e-3)
    np.testing.assert_allclose(out.spacing, ref.spacing, atol=1e-5)
    return out.array


def test_info_lists_ready_models(client) -> None:
    info = client.info()
    models = info["models"]
    assert {k: v["type"] for k, v in models.items()} == {
        "medsam3_auto": "segmentation",
        "medsam3_clicks": "deepgrow",
        "medsam3_vista3d": "vista3d",
    }
    assert all(m["ready"] for m in models.values())
    assert info["labels"][:2] == ["liver", "spleen"] and set(info["strategies"]) == {"random", "first", "uncertainty"}
    assert set(info["scoring"]) == {"medsam3_uncertainty"}
    assert models["medsam3_vista3d"]["labels"]["liver"] == 1 and "background" not in models["medsam3_auto"]["labels"]
    assert models["medsam3_clicks"]["config"] == {"text": ""}


def test_slicer_auto_segmentation(client, server) -> None:
    params = {**SLICER_AUTO, "labels": "liver, spleen"}
    result_file, result = client.infer("medsam3_auto", "ct_lps", params)
    label = _assert_same_grid(result_file, server[1] / "ct_lps.nii.gz")
    assert set(np.unique(label)) <= {0, 1, 2} and result_file.endswith(".nrrd")
    assert list(result["label_names"].items())[:2] == [("liver", 1), ("spleen", 2)]  # values 1..N, as Slicer reads them
    assert {"io_read", "image_encoder", "heads", "server_total"} <= set(result["timings"])


def test_slicer_clicks_reuse_the_encoding(client, server) -> None:
    studies = server[1]
    liver = np.argwhere(read_image(studies.parent / "phantoms" / "ct_psr_label.nii.gz").array == 1)
    inside, outside = liver[len(liver) // 2].tolist(), [0, 0, 0]
    params = {"text": "", "label": "liver", "foreground": [inside], "background": [], "result_extension": ".nrrd"}
    params["result_dtype"] = "uint8"
    first_file, first = client.infer("medsam3_clicks", "ct_psr", params)
    label = _assert_same_grid(first_file, studies / "ct_psr.nii.gz")
    assert set(np.unique(label)) <= {0, 1}  # a single-label mask for the segment
    params["background"] = [outside]
    _, second = client.infer("medsam3_clicks", "ct_psr", params)
    assert second["encoding_cache"] == "hit" and "image_encoder" not in second["timings"]
    assert second["labels"][0]["source"] == "clicks"


def test_ohif_vista3d_payload(client, server) -> None:
    # OHIF's exact keys: raw (uncompressed) uint8 NRRD, label values = the model's label indices.
    ohif = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
    params = {**ohif, "label_prompt": [4], "points": [[10, 12, 5], [2, 2, 5]], "point_labels": [1, 0]}
    result_file, result = client.infer("medsam3_vista3d", "ct_ras", params)
    label = _assert_same_grid(result_file, server[1] / "ct_ras.nii.gz")
    assert set(np.unique(label)) <= {0, 4} and result["labels"][0]["source"] == "clicks"
    assert b"encoding: raw" in Path(result_file).read_bytes()[:400]
    _, result = client.infer("medsam3_vista3d", "ct_ras", {**ohif, "label_prompt": [1, 4]})
    assert [row["name"] for row in result["labels"]] == ["liver", "left kidney"]


def test_save_label_and_next_sample(client, server, tmp_path) -> None:
    result_file, _ = client.infer("medsam3_auto", "ct_ras", {**SLICER_AUTO, "labels": "liver"})
    client.save_label("ct_ras", result_file, params={"label_info": [{"name": "liver", "idx": 1}]})
    assert (server[1] / "labels" / "final" / "ct_ras.nrrd").exists() or list(
        (server[1] / "labels" / "final").glob("ct_ras*")
    )
    first = client.next_sample("first", {})
    assert first["id"] in {"ct_lps", "ct_psr"}  # the labelled image is not offered again
    assert client.next_sample("random", {})["id"] in {"ct_lps", "ct_psr"}


def test_uncertainty_scoring_and_strategy(client, server) -> None:
    """The server scores unlabelled images at start-up (in a subprocess); the strategy takes the top score."""
    url = server[0]
    response = requests.post(f"{url}/scoring/medsam3_uncertainty", json={}, timeout=60)
    assert response.status_code in (200, 429), response.text  # 429: the start-up scoring is still running
    scores: dict[str, float] = {}
    deadline = time.time() + 300
    while time.time() < deadline and not {"ct_lps", "ct_psr"} <= set(scores):
        time.sleep(2)
        objects = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
        for image_id, entry in objects.items():
            info = entry.get("image", {}).get("info", {})
            if "medsam3_uncertainty" in info:
                scores[image_id] = info["medsam3_uncertainty"]["score"]
    assert {"ct_lps", "ct_psr"} <= set(scores) and all(0.0 <= v <= 1.0 for v in scores.values())
    chosen = client.next_sample("uncertainty", {})
    unlabelled = [
        image_id for image_id in scores if not (server[1] / "labels" / "final" / f"{image_id}.nii.gz").exists()
    ]
    assert chosen["id"] == max(sorted(unlabelled), key=scores.get)
    assert chosen["uncertainty_score"] == scores[chosen["id"]]


@pytest.mark.parametrize(
    ("model", "image", "params", "status", "message"),
    [
        ("nope", "ct_ras", {}, 400, "There is no model 'nope' available"),
        ("medsam3_auto", "no_such_image", {}, 404, "Image not found in the datastore"),
        ("medsam3_clicks", "ct_ras", {"foreground": [[40, 0, 0]]}, 400, r"Point \[40, 0, 0\] is outside the image"),
        ("medsam3_clicks", "ct_ras", {"foreground": "[[1, 2"}, 400, "foreground is not a valid JSON list"),
        ("medsam3_clicks", "ct_ras", {"label": "Segment_1"}, 400, "No clicks"),
        ("medsam3_auto", "ct_ras", {"label_prompt": [999]}, 400, "Label index 999 is not one of this model's labels"),
        ("medsam3_clicks", "ct_ras", {"foreground": [[5, 5, 5]], "roi": [1, 2, 3]}, 400, "roi must have 6 numbers"),
        ("medsam3_auto", "ct_ras", {"result_extension": ".exe"}, 400, "result_extension must be one of"),
    ],
)
def test_bad_requests_get_4xx(client, server, model, image, params, status, message) -> None:
    with pytest.raises(MONAILabelClientException) as raised:
        client.infer(model, image, params)
    detail = raised.value.args[-1]  # "Status: <code>; Response: <body>"
    assert detail.startswith(f"Status: {status};") and re.search(message, detail), detail
    assert requests.get(f"{server[0]}/info/", timeout=10).status_code == 200  # still serving


def test_malformed_params_and_corrupt_upload(server, tmp_path) -> None:
    url = server[0]
    response = requests.post(f"{url}/infer/medsam3_auto?image=ct_ras", data={"params": "{not json"}, timeout=60)
    assert response.status_code == 400 and "params is not valid JSON" in response.json()["detail"]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b" + os.urandom(500))
    with corrupt.open("rb") as handle:
        response = requests.post(
            f"{url}/infer/medsam3_auto", data={"params": "{}"}, files={"file": ("corrupt.nii.gz", handle)}, timeout=60
        )
    assert response.status_code == 400 and "Cannot read image" in response.json()["detail"]
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def unready_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    yield from start_server(
        tmp_path_factory.mktemp("unready"), "--conf", "model_size", "tiny", "--conf", "checkpoint", "/nowhere/model.pt"
    )


def test_server_without_weights_says_why(unready_server) -> None:
    client = MONAILabelClient(unready_server[0])
    models = client.info()["models"]
    assert not any(m["ready"] for m in models.values())
    assert "weights not found at /nowhere/model.pt" in models["medsam3_auto"]["status"]
    with pytest.raises(MONAILabelClientException) as raised:
        client.infer("medsam3_auto", "ct_ras", {})
    assert raised.value.args[-1].startswith("Status: 503;") and "weights not found" in raised.value.args[-1]
