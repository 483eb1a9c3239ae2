"""End to end through OHIF v3 in a real browser: Orthanc PACS -> MONAI Label server (demo model) -> the OHIF viewer
MONAI Label serves at ``/ohif/`` -> its MONAI Label panel (Auto, Point and Class tabs).

The requests are checked as the browser sent them and the answers as it received them (NRRD label maps), and the
overlay as it appears on screen. Screenshots, answers, the console and the server log go to ``test-artifacts/ohif/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ohif_browser
import orthanc
import pytest
import requests
from monailabel_server import REPO, free_port, server_process
from ohif_browser import Exchange, OhifViewer, coloured_pixels, wait_until
from scipy import ndimage

from scripts.image_io import read_image
from scripts.metrics import dice
from scripts.phantom import PHANTOM_LABELS, write_phantom
from scripts.vocabulary import load_vocabulary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ohif_browser.available(), reason="needs Debian's chromium and chromium-driver"),
    pytest.mark.skipif(not orthanc.available(), reason="needs Debian's orthanc and orthanc-dicomweb"),
]

ARTEFACTS = REPO / "test-artifacts" / "ohif"
SHAPE = (64, 64, 24)  # columns, rows, slices of the phantom series
AUTO, VISTA, CLICKS = "medsam3_auto", "medsam3_vista3d", "medsam3_clicks"
RESULT_PARAMS = {
    "result_extension": ".nrrd",
    "result_dtype": "uint8",
    "result_compress": False,
    "restore_label_idx": False,
}
PHANTOM = {name: value for value, name in PHANTOM_LABELS.items()}  # the phantom's label values
OVERLAY_PIXELS = 3000  # coloured screen pixels Auto must add to the axial view (measured: 11,800 at 1920 x 1080)


@dataclass(frozen=True)
class Study:
    study_uid: str
    series_uid: str
    label: np.ndarray  # the phantom's label map, voxel (i, j, k) of the series as stored
    spacing: tuple[float, ...]


@dataclass(frozen=True)
class Server:
    url: str
    labels: dict[str, int]  # the models' label values, as /info lists them


@pytest.fixture(scope="module")
def artefacts() -> Path:
    """``test-artifacts/ohif/``, emptied: this run's screenshots, answers, console and server log."""
    shutil.rmtree(ARTEFACTS, ignore_errors=True)
    ARTEFACTS.mkdir(parents=True)
    return ARTEFACTS


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Iterator[orthanc.Pacs]:
    with orthanc.run_orthanc(tmp_path_factory.mktemp("orthanc")) as running:
        yield running


@pytest.fixture(scope="module")
def study(pacs: orthanc.Pacs, tmp_path_factory) -> Study:
    """A CT phantom stored as a DICOM series (LPS, as a scanner stores axial slices) in the PACS."""
    folder, label_file = write_phantom(tmp_path_factory.mktemp("phantom"), "ct_ohif", fmt="dicom", shape=SHAPE, seed=7)
    pacs.upload(sorted(path for path in folder.iterdir() if path.is_file()))
    (series,) = pacs.series()
    label = read_image(label_file)
    return Study(series["0020000D"]["Value"][0], series["0020000E"]["Value"][0], label.array, tuple(label.spacing))


@pytest.fixture(scope="module")
def server(pacs: orthanc.Pacs, study: Study, artefacts: Path, tmp_path_factory) -> Iterator[Server]:
    """The app on the PACS with the demo model. The PACS credentials are the app's options: its DICOMweb proxy,
    which OHIF reads through, must get them too (MONAI Label alone takes them only from environment variables)."""
    root = tmp_path_factory.mktemp("server")
    password = root / "pacs_password"
    password.write_text(pacs.auth[1])
    conf = ["--conf", "configs", "demo.json"]  # the demo model, as the README runs it
    conf += ["--conf", "dicomweb_user", pacs.auth[0], "--conf", "dicomweb_password_file", str(password)]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MONAI_LABEL_DICOMWEB_USERNAME", raising=False)
        patch.delenv("MONAI_LABEL_DICOMWEB_PASSWORD", raising=False)
        patch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(root / "dicom_cache"))
        try:
            for url, _ in server_process(root, pacs.dicomweb, free_port(), *conf):
                labels = requests.get(f"{url}/info/", timeout=30).json()["models"][AUTO]["labels"]
                yield Server(url, labels)
        finally:
            if (root / "server.log").exists():
                shutil.copy(root / "server.log", artefacts / "server.log")


@pytest.fixture(scope="module")
def viewer(server: Server, artefacts: Path) -> Iterator[OhifViewer]:
    with ohif_browser.launch(server.url, artefacts) as running:
        yield running


@pytest.fixture(scope="module")
def connected(viewer: OhifViewer, study: Study) -> OhifViewer:
    """The study open in the MONAI Label mode, its panel connected to the server."""
    viewer.open_study_list()
    viewer.open_study(study.study_uid)
    info = viewer.connect()
    assert info.status == 200, info.body
    viewer.screenshot("connected")
    return viewer


def test_the_study_list_shows_the_study(viewer: OhifViewer, study: Study) -> None:
    rows = viewer.open_study_list()
    viewer.screenshot("study_list")
    assert study.study_uid in rows, rows
    assert "Phantom" in rows[study.study_uid] and "CT" in rows[study.study_uid], rows


def test_auto_segmentation_shows_the_organs(connected: OhifViewer, study: Study, server: Server) -> None:
    before = coloured_pixels(connected.viewport_image())
    connected.screenshot("auto_before")
    exchange = connected.run_auto(AUTO)
    connected.screenshot("auto_after")
    values = _label_map(exchange, study, AUTO, "auto")
    assert "label_prompt" not in exchange.params  # segmentation-type models get no labels from the Auto tab

    assert server.labels["spleen"] in values, np.unique(values)
    assert dice(values == server.labels["liver"], study.label == PHANTOM["liver"]) >= 0.5
    assert not _mr_only(values, server), f"Auto on a CT series answered MR-only structures {_mr_only(values, server)}"

    def gained() -> int:
        return coloured_pixels(connected.viewport_image()) - before

    try:
        wait_until(lambda: gained() >= OVERLAY_PIXELS, 10, "the overlay")
    except TimeoutError:
        pytest.fail(
            f"no overlay in the axial view: {gained()} coloured pixels more than before (want {OVERLAY_PIXELS})"
        )


def test_a_point_in_the_liver_segments_the_liver(connected: OhifViewer, study: Study, server: Server) -> None:
    target = _deep_liver_voxel(study.label)
    exchange = connected.run_point(VISTA, "liver", target, SHAPE[:2])
    connected.screenshot("point")
    values = _label_map(exchange, study, VISTA, "point")
    params = exchange.params
    (point,) = params["points"]
    assert params["point_labels"] == [1] and params["label_prompt"] == [server.labels["liver"]], params
    i, j, k = point
    assert abs(i - target[0]) <= 1 and abs(j - target[1]) <= 1, f"clicked voxel {point}, aimed at {target}"
    assert study.label[i, j, k] == PHANTOM["liver"], f"the click {point} is not in the phantom's liver"

    liver = values == server.labels["liver"]
    assert set(np.unique(values)) <= {0, server.labels["liver"]}
    assert liver[i, j, k], "the clicked voxel is not in the mask"
    assert liver[i - 1 : i + 2, j - 1 : j + 2, max(k - 1, 0) : k + 2].mean() >= 0.5, "nor most of its neighbours"
    assert dice(liver, study.label == PHANTOM["liver"]) >= 0.5


def test_a_point_on_the_deepgrow_model_refines_around_it(connected: OhifViewer, study: Study, server: Server) -> None:
    """OHIF's Point tab on a ``deepgrow``-type model sends ``foreground``/``background`` and no segment name: the
    clicks alone segment the structure under them (the clicked voxel is always foreground, docs/clicks.md)."""
    target = _deep_liver_voxel(study.label)
    exchange = connected.run_point(CLICKS, "liver", target, SHAPE[:2])
    connected.screenshot("point_deepgrow")
    values = _label_map(exchange, study, CLICKS, "point_deepgrow")
    (point,) = exchange.params["foreground"]
    assert exchange.params.get("background") in (None, []), exchange.params
    i, j, k = point
    assert abs(i - target[0]) <= 1 and abs(j - target[1]) <= 1 and study.label[i, j, k] == PHANTOM["liver"], point
    mask = values > 0
    assert mask[i, j, k] and mask[i - 1 : i + 2, j - 1 : j + 2, k].mean() >= 0.5
    assert (mask & (study.label == PHANTOM["liver"])).sum() > 0.5 * mask.sum()  # mostly liver, not spilling over


def test_class_prompts_segment_the_ticked_organs(connected: OhifViewer, study: Study, server: Server) -> None:
    exchange = connected.run_class(AUTO, ["liver", "spleen"])
    connected.screenshot("class")
    wanted = [server.labels["liver"], server.labels["spleen"]]
    assert sorted(exchange.params["label_prompt"]) == wanted, exchange.params
    values = _label_map(exchange, study, AUTO, "class")
    assert set(np.unique(values)) <= {0, *wanted}
    assert dice(values == wanted[0], study.label == PHANTOM["liver"]) >= 0.5
    assert (values == wanted[1]).any()


def test_the_class_tab_default_segments_a_default_set(connected: OhifViewer, study: Study, server: Server) -> None:
    """OHIF's Class tab with nothing ticked sends ``label_prompt: []``; the app answers its default set."""
    exchange = connected.run_class(AUTO, [])
    connected.screenshot("class_default")
    assert exchange.params["label_prompt"] == []
    values = _label_map(exchange, study, AUTO, "class_default")
    assert server.labels["liver"] in values, np.unique(values)
    assert not _mr_only(values, server), f"a CT series' default set has MR-only structures {_mr_only(values, server)}"


def _label_map(exchange: Exchange, study: Study, model: str, name: str) -> np.ndarray:
    """The checked answer of an OHIF infer request: its URL and result options, then the NRRD it got back (saved to
    the artefacts), uncompressed uint8 on the series' grid."""
    if exchange.body is not None:
        (ARTEFACTS / f"{name}.nrrd").write_bytes(exchange.body)
    assert exchange.path == f"/infer/{model}" and exchange.method == "POST", exchange.url
    assert exchange.query == {"image": study.series_uid, "output": "image"}, exchange.url
    assert exchange.params.items() >= RESULT_PARAMS.items(), exchange.params
    assert exchange.status == 200, (exchange.status, exchange.body and exchange.body[:500])
    header, values, header_bytes = exchange.nrrd()
    assert header["encoding"] == "raw" and values.dtype == np.uint8, header
    assert len(exchange.body) == header_bytes + values.size  # as sent: no compression
    assert values.shape == study.label.shape == SHAPE
    assert np.allclose(np.linalg.norm(header["space directions"], axis=1), study.spacing), header
    assert values.any(), "empty label map"
    return values


def _mr_only(values: np.ndarray, server: Server) -> list[str]:
    """The MR-only vocabulary structures present in a label map."""
    mr_only = {entry.name for entry in load_vocabulary() if "CT" not in entry.modalities}
    return sorted(name for name, value in server.labels.items() if name in mr_only and value in values)


def _deep_liver_voxel(label: np.ndarray) -> tuple[int, int]:
    """(i, j) deepest inside the liver on both middle slices (whichever of them the viewer opens on)."""
    middle = label.shape[2] // 2
    core = (label[:, :, middle - 1 : middle + 1] == PHANTOM["liver"]).all(axis=2)
    depth = ndimage.distance_transform_edt(core)
    i, j = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return int(i), int(j)
