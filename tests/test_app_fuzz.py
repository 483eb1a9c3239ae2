"""A server that input cannot break: generated hostile requests get 4xx, limits hold, and work does not queue
behind work (a real server on 127.0.0.1, the tiny model)."""

from __future__ import annotations

import collections
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fuzz_requests import fuzz_requests, nifti_bytes
from monailabel_server import server_temp, start_server

from scripts.phantom import write_phantom

pytestmark = pytest.mark.slow

IMAGES = ["ct_ras", "ct_lps", "ct_psr"]
LABELS = "liver,spleen,left kidney,right kidney,aorta,vertebrae,stomach,pancreas"
LIMITS = ["--conf", "max_prompts", "8", "--conf", "max_points", "20", "--conf", "max_upload_mb", "2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    conf = ["--conf", "model_size", "tiny", "--conf", "checkpoint", "random", "--conf", "labels", LABELS, *LIMITS]
    yield from start_server(root, *conf)


@pytest.fixture(scope="module")
def big_image(tmp_path_factory) -> bytes:
    """A phantom large enough that inferring all labels takes seconds on the tiny model."""
    image, _ = write_phantom(tmp_path_factory.mktemp("big"), "big", shape=(128, 128, 64), seed=3)
    return image.read_bytes()


def test_generated_hostile_requests_get_no_5xx(server) -> None:
    url, studies = server
    outside = studies.parent / "outside_sentinel"
    before = sorted(p.name for p in studies.parent.iterdir())
    temp = server_temp(studies.parent)
    kept = temp_files(temp)  # MONAI Label's logging configuration, written at start-up
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures = []
    for request in fuzz_requests(IMAGES, count=300, seed=1):
        response = requests.request(request.method, url + request.path, timeout=60, **request.kwargs)
        statuses[request.kind][response.status_code] += 1
        if response.status_code >= 500:
            failures.append(
                (request.kind, request.method, request.path, str(request.kwargs)[:160], response.text[:200])
            )
    assert not failures, {f[0]: f for f in failures}
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200
    assert sum(sum(c.values()) for c in statuses.values()) == 300
    assert sum(c[200] for c in statuses.values()) < 300  # hostile requests were refused, not all waved through
    assert not outside.exists() and sorted(p.name for p in studies.parent.iterdir()) == before
    assert all((studies / f"{name}.nii.gz").is_file() for name in IMAGES)  # nothing deleted
    assert statuses["upload"][400] and statuses["label upload"][400] and statuses["session"][400], statuses
    deadline = time.monotonic() + 10

    def left() -> list[str]:  # the server's results folder stays, empty: each result goes once it is sent
        return sorted(set(temp_files(temp)) - set(kept))

    while left() and time.monotonic() < deadline:  # accepted uploads go once their answer is sent
        time.sleep(0.2)
    assert not left(), f"{len(left())} refused uploads left their temporary copies behind: {left()[:5]}"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_params_the_datastore_could_not_keep_get_400_and_change_nothing(server) -> None:
    """Label params must be a JSON object the datastore can write back as strict JSON: stored, NaN or a lone
    surrogate made its file unreadable at the next start (and every label's info was lost); a list replaced the
    label file and then failed with 500. ``save_label`` is a yes/no flag: "false" saved the result all the same.
    A strategy is a name."""
    url, studies = server
    before = _files(studies)

    def infer(params: dict) -> requests.Response:
        return requests.post(f"{url}/infer/medsam3_auto?image=ct_ras", data={"params": _json(params)}, timeout=60)

    for params in ('{"note": "\\ud800"}', '{"score": NaN}', "[1]"):
        label = {"label": ("label.nii.gz", b"label")}
        response = requests.put(
            f"{url}/datastore/label", params={"image": "ct_ras"}, data={"params": params}, files=label, timeout=60
        )
        assert response.status_code == 400 and "Label not saved: its params must be" in response.text, response.text
    for params, message in (
        ({"save_label": "maybe"}, "save_label must be true or false"),
        ({"save_label": True, "result_extension": ".dcm"}, "save_label keeps the result in the datastore"),
        ({"result_compress": "perhaps"}, "result_compress must be true or false"),
    ):
        response = infer(params)
        assert response.status_code == 400 and message in response.text, response.text[:300]
    assert infer({"save_label": "false"}).status_code == 200 and _files(studies) == before  # nothing saved
    response = requests.post(f"{url}/activelearning/random", json={"strategy": ["x"]}, timeout=60)
    assert response.status_code == 404 and "No active learning strategy ['x']" in response.text
    assert infer({"save_label": "yes"}).status_code == 200 and set(_files(studies)) > set(before)  # what saving does


def temp_files(temp: Path) -> list[str]:
    """Files and folders in a server's temporary folder but torch's compile cache and the (kept) results folder
    itself: the results in it go once sent."""
    found = (p.relative_to(temp) for p in temp.rglob("*"))
    return sorted(str(p) for p in found if not p.parts[0].startswith("torchinductor_") and str(p) != "medsam3_results")


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        (
            {"labels": ",".join(f"thing {i}" for i in range(9))},
            400,
            "9 text prompts in one request; this server takes at most 8",
        ),
        ({"text": ";".join(f"thing {i}" for i in range(9))}, 400, "9 text prompts in one request; this server takes"),
        ({"labels": LABELS}, 200, ""),
    ],
)
def test_prompt_limit(server, params, status, message) -> None:
    response = requests.post(f"{server[0]}/infer/medsam3_auto?image=ct_ras", data={"params": _json(params)}, timeout=60)
    assert response.status_code == status, response.text[:300]
    assert message in response.text


def test_click_and_size_limits(server) -> None:
    url = server[0]
    clicks = {"foreground": [[5, 5, 5]] * 21}
    response = requests.post(f"{url}/infer/medsam3_clicks?image=ct_ras", data={"params": _json(clicks)}, timeout=60)
    assert response.status_code == 400 and "21 clicks in one request" in response.text and "max_points" in response.text
    bomb = nifti_bytes((2, 2, 2), claim=(30000, 30000, 30000))
    response = requests.post(
        f"{url}/infer/medsam3_auto", data={"params": "{}"}, files={"file": ("bomb.nii.gz", bomb)}, timeout=60
    )
    assert response.status_code == 400 and "claims 27,000,000,000,000 voxels" in response.text, response.text[:300]
    too_big = b"\0" * (3 * 2**20)
    response = requests.post(
        f"{url}/infer/medsam3_auto", data={"params": "{}"}, files={"file": ("big.nii", too_big)}, timeout=60
    )
    assert response.status_code == 413
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200


def test_malformed_params_shapes_get_400(server) -> None:
    url = server[0]
    for params in ("123", "[1, 2]", "null", "true", '"text"', "[" * 1000 + "]" * 1000):
        response = requests.post(f"{url}/infer/medsam3_auto?image=ct_ras", data={"params": params}, timeout=60)
        assert response.status_code == 400, (params[:20], response.status_code, response.text[:200])
    response = requests.post(f"{url}/activelearning/nope", json={}, timeout=60)
    assert response.status_code == 404 and "No active learning strategy 'nope'" in response.text
    deep = "[" * 1000 + "]" * 1000
    response = requests.post(
        f"{url}/activelearning/random", data=deep, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code in (400, 422), response.text[:200]
    clicks = {"foreground": [[5, 5, 5]], "roi": ["inf", 1, 0, 1, 0, 1]}
    response = requests.post(f"{url}/infer/medsam3_clicks?image=ct_ras", data={"params": _json(clicks)}, timeout=60)
    assert response.status_code == 400 and "roi must be finite numbers" in response.text


def _json(value: object) -> str:
    import json

    return json.dumps(value)


def _infer_all_labels(url: str, image: bytes, timeout: float) -> requests.Response:
    """Every vocabulary label on the uploaded image (the slow request of these tests)."""
    return requests.post(
        f"{url}/infer/medsam3_auto",
        data={"params": _json({"labels": LABELS})},
        files={"file": ("big.nii.gz", image)},
        timeout=timeout,
    )


def test_info_and_datastore_answer_while_inference_runs(server, big_image) -> None:
    url = server[0]
    reads = ("/info/", "/datastore/?output=all", "/datastore/image/info?image=ct_ras")
    timed: list[tuple[str, float, float]] = []  # (read, sent, answered)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for path in reads:
                sent = time.perf_counter()
                if requests.get(url + path, timeout=300).status_code == 200:
                    timed.append((path, sent, time.perf_counter()))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        started = time.perf_counter()
        response = _infer_all_labels(url, big_image, timeout=300)
        finished = time.perf_counter()
    finally:
        done.set()
        poller.join()
    assert response.status_code == 200, response.text[:300]
    # Reads sent after the inference began were answered well before it ended (before, they waited for it).
    during = {path for path, sent, answered in timed if sent > started + 0.3 and answered < finished - 0.3}
    assert set(reads) <= during, (finished - started, timed[:12])


def test_slow_uploads_do_not_stall_downloads(server) -> None:
    """A working request holds its thread while its client sends the body: 40 clients trickling their uploads used
    to take every thread of the pool that file downloads share, and downloads hung until they left."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    head = (
        b"PUT /datastore/label?image=ct_ras HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b"
    )
    slow = []
    try:
        for _ in range(41):
            slow.append(socket.create_connection((host, int(port))))
            slow[-1].sendall(head)
        time.sleep(1.0)
        response = requests.get(f"{url}/datastore/image", params={"image": "ct_ras"}, timeout=15)
        assert response.status_code == 200 and len(response.content) > 1000
    finally:
        for connection in slow:
            connection.close()


def test_a_request_whose_client_left_stops(server, big_image) -> None:
    url, studies = server
    log = studies.parent / "server.log"
    start = time.perf_counter()
    with pytest.raises(requests.exceptions.ReadTimeout):
        _infer_all_labels(url, big_image, timeout=1.0)
    deadline = time.time() + 120
    while "Stopped a " not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert "Stopped a " in log.read_text() and "client that asked for this work has gone" in log.read_text()
    # The model is free again: a small request is answered (it would have queued behind the abandoned one).
    response = requests.post(
        f"{url}/infer/medsam3_clicks?image=ct_ras", data={"params": _json({"foreground": [[5, 5, 5]]})}, timeout=120
    )
    assert response.status_code == 200
    assert time.perf_counter() - start > 1.0
