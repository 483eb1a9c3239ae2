"""The app on a real PACS: Orthanc with DICOMweb, phantom CT and MR series, the demo model, MONAI Label's client.

Checks what a hospital deployment relies on: every image series listed (MR too) and new ones seen within the
cache time, inference by SeriesInstanceUID, results as DICOM SEG on request, a submitted label stored in the PACS
as a SEG that references its series, carries the label names and SNOMED CT codes and decodes to the same mask, and
bad DICOM refused with a clear 4xx while the server keeps serving.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bad_dicom
import numpy as np
import pydicom
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.config import settings as monailabel_settings
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel_server import REPO, free_port, server_process
from orthanc import USER, Pacs, available, run_orthanc

sys.path.insert(0, str(REPO / "monailabel_app"))
from lib import safe_paths  # noqa: E402
from lib.auto_labels import AutoLabels  # noqa: E402
from lib.dicomweb import PacsDatastore  # noqa: E402
from lib.dicomweb_proxy import install_dicomweb_proxy  # noqa: E402
from lib.settings import AppSettings  # noqa: E402

from scripts.dicom_seg import read_seg
from scripts.image_io import read_image
from scripts.image_writing import write_label
from scripts.phantom import write_phantom
from scripts.vocabulary import load_vocabulary

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason="Orthanc with DICOMweb is not installed")]

SHAPE = (48, 40, 16)
DEMO = REPO / "bundle" / "models" / "demo_tiny.pt"


@dataclass
class Chain:
    pacs: Pacs
    url: str
    series: dict[str, str]  # phantom name -> SeriesInstanceUID
    folders: dict[str, Path]  # phantom name -> its DICOM folder
    labels: dict[str, Path]  # phantom name -> its true label map (in the series' grid)
    root: Path


def _series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("pacs")
    with run_orthanc(root / "orthanc") as pacs, pytest.MonkeyPatch.context() as env:
        env.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(root / "dicom_cache"))
        folders, labels = {}, {}
        for name, kind, geometry in (("ct", "ct", {"orientation": "PSR"}), ("mr", "mr", {"tilt_deg": 15.0})):
            folders[name], labels[name] = write_phantom(
                root / "phantoms", name, kind=kind, fmt="dicom", shape=SHAPE, seed=101, **geometry
            )
            pacs.upload(sorted(folders[name].iterdir()))
        password = root / "pacs_password"
        password.write_text(pacs.auth[1] + "\n")
        conf = ["--conf", "model_size", "tiny", "--conf", "ckpt_path", str(DEMO), "--conf", "dicomweb_user", USER]
        conf += ["--conf", "dicomweb_password_file", str(password), "--conf", "dicomweb_cache_seconds", "1"]
        for url, _ in server_process(root, pacs.dicomweb, free_port(), *conf):
            yield Chain(pacs, url, {n: _series_uid(f) for n, f in folders.items()}, folders, labels, root)


def _total(url: str) -> int:
    return requests.get(f"{url}/datastore/?output=stats", timeout=60).json()["total"]


def test_every_image_series_is_listed_and_new_ones_appear(chain: Chain) -> None:
    assert _total(chain.url) == 2  # the MR too (MONAI Label lists only Modality=CT by default)
    extra, _ = write_phantom(chain.root / "phantoms", "late", fmt="dicom", shape=(16, 16, 4), seed=7)
    chain.pacs.upload(sorted(extra.iterdir()))
    deadline = time.monotonic() + 20
    while _total(chain.url) != 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _total(chain.url) == 3  # seen within the cache time (1 s here), not after two hours


def test_ohif_reads_the_pacs_through_the_proxy_with_the_apps_credentials(chain: Chain) -> None:
    """OHIF's ``/proxy/dicom``: QIDO with its query, WADO metadata, the PACS's content type; the PACS wants a password
    the viewer never sends, and a viewer's own credentials never reach it."""
    ct = _series_uid(chain.folders["ct"])
    studies = requests.get(
        f"{chain.url}/proxy/dicom/qido/series",
        params=[("SeriesInstanceUID", ct), ("includefield", "00180015"), ("includefield", "0020000D")],  # both pass
        headers={"Accept": "application/dicom+json", "Authorization": "Basic bm9ib2R5Om5vdGhpbmc="},
        timeout=60,
    )
    assert studies.status_code == 200 and studies.headers["content-type"].startswith("application/dicom+json")
    (found,) = studies.json()  # the query reached the PACS: one series, not all of them
    assert found["0020000E"]["Value"] == [ct] and found["00180015"]["Value"] == ["ABDOMEN"]  # BodyPartExamined
    study = found["0020000D"]["Value"][0]
    metadata = requests.get(f"{chain.url}/proxy/dicom/wado/studies/{study}/series/{ct}/metadata", timeout=60)
    assert metadata.status_code == 200 and len(metadata.json()) == len(list(chain.folders["ct"].iterdir()))
    missing = requests.get(f"{chain.url}/proxy/dicom/qido/studies/1.2.3/series", timeout=60)
    assert missing.status_code in (200, 204, 404)  # the PACS's own answer, passed on


def test_instance_uids_from_the_pacs_never_name_files(chain: Chain) -> None:
    """MONAI Label's series download saved each instance as ``<SOPInstanceUID>.dcm``: a UID that is a path (here an
    absolute one; ``../..`` climbs as well) wrote a file the PACS's sender chose, outside the cache."""
    folder, _ = write_phantom(chain.root / "phantoms", "planting", fmt="dicom", shape=(16, 16, 4), seed=9)
    files = sorted(folder.iterdir())
    first = pydicom.dcmread(str(files[0]))
    target = chain.root / "planted"
    first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = str(target)
    first.save_as(str(files[0]))
    chain.pacs.upload(files)
    response = requests.get(f"{chain.url}/datastore/image", params={"image": _series_uid(folder)}, timeout=120)
    assert response.status_code in (200, 400), response.text[:300]
    assert not target.with_suffix(".dcm").exists() and not list(chain.root.rglob("planted*"))


def test_only_a_seg_is_fetched_as_a_label(chain: Chain) -> None:
    """MONAI Label's label download fetched any series given as a label id into the label cache (even modalities the
    server does not serve); only a DICOM SEG is fetched now."""
    uid = chain.series["mr"]
    response = requests.get(f"{chain.url}/datastore/label", params={"label": uid, "tag": "final"}, timeout=120)
    assert response.status_code == 404 and f"No DICOM SEG {uid}" in response.text, response.text[:300]
    assert not [p for p in (chain.root / "dicom_cache").rglob(uid) if p.parent.name == "final"]


def test_installing_the_proxy_again_replaces_it() -> None:
    """MONAI Label's ``/reload`` runs the app's start-up again: the proxy's route must not pile up."""
    from monailabel.app import app as server

    before = len(server.router.routes)
    for timeout in (5.0, 7.0):
        install_dicomweb_proxy("http://127.0.0.1:1/dicom-web", None, timeout)
    ours = [r for r in server.router.routes if getattr(r, "name", None) == "medsam3_dicomweb_proxy"]
    assert len(ours) == 1 and server.router.routes[0] is ours[0] and len(server.router.routes) == before + 1


def _pacs_settings(chain: Chain, tmp_path: Path, monkeypatch, **conf: str) -> AppSettings:
    """The app's settings for the test PACS (user and password file), for a datastore built in this process."""
    for name in ("MONAI_LABEL_DICOMWEB_USERNAME", "MONAI_LABEL_DICOMWEB_PASSWORD"):  # the app sets them for the proxy
        monkeypatch.setattr(monailabel_settings, name, "")
    password = tmp_path / "password"
    password.write_text(chain.pacs.auth[1])
    return AppSettings.from_conf({"dicomweb_user": USER, "dicomweb_password_file": str(password), **conf})


def test_odd_pacs_answers_still_list(chain: Chain, tmp_path: Path, monkeypatch, caplog) -> None:
    """A PACS that ignores QIDO's ``offset`` (it answers the first page again) kept the listing asking for good; a
    SEG whose metadata names no referenced series failed the labelled-series listing, and with it ``/info``."""
    from lib import dicomweb

    store = PacsDatastore(chain.pacs.dicomweb, _pacs_settings(chain, tmp_path, monkeypatch), {}, None, str(tmp_path))
    real_search, asked = store._client.search_for_series, []

    def ignoring_offset(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.append(kwargs)
        if kwargs.get("search_filters", {}).get("Modality") == "SEG":
            return [{"0020000E": {"Value": ["1.2.3.4"]}, "0020000D": {"Value": ["1.2.3"]}}]
        return real_search(search_filters=kwargs.get("search_filters", {}))  # every series, whatever was asked

    monkeypatch.setattr(dicomweb, "PAGE_SIZE", 2)
    monkeypatch.setattr(store._client, "search_for_series", ignoring_offset)
    monkeypatch.setattr(store._client, "retrieve_series_metadata", lambda study, series: [])
    listed = store.list_images()
    assert set(chain.series.values()) <= set(listed) and len(listed) == len(set(listed)) and len(asked) == 2
    assert store.get_labeled_images() == [] and "Skipped SEG 1.2.3.4" in caplog.text


def test_modalities_option_narrows_the_list(chain: Chain, tmp_path: Path, monkeypatch) -> None:
    """``--conf dicomweb_modalities MR``: only MR series are listed, and a CT series is not served even by its UID,
    whether it is new or was cached before the setting narrowed (the datastore the app builds, in this process)."""
    settings = _pacs_settings(chain, tmp_path, monkeypatch, dicomweb_modalities="mr")
    store = PacsDatastore(chain.pacs.dicomweb, settings, {}, load_vocabulary(), str(tmp_path))
    assert store.list_images() == [chain.series["mr"]]
    with pytest.raises(ImageNotFoundException, match="is CT: this server serves MR series only"):
        store.get_image_uri(chain.series["ct"])
    assert not [p for p in Path(store._datastore.image_path()).iterdir() if chain.series["ct"] in p.name]
    assert (
        read_image(store.get_image_uri(chain.series["mr"])).array.shape == read_image(chain.folders["mr"]).array.shape
    )
    cache, wide = str(tmp_path / "cache"), _pacs_settings(chain, tmp_path, monkeypatch)
    PacsDatastore(chain.pacs.dicomweb, wide, {}, None, cache).get_image_uri(chain.series["ct"])  # cached while wide
    with pytest.raises(ImageNotFoundException, match="is CT: this server serves MR series only"):
        PacsDatastore(chain.pacs.dicomweb, settings, {}, None, cache).get_image_uri(chain.series["ct"])
    password = tmp_path / "password"
    monkeypatch.setattr(monailabel_settings, "MONAI_LABEL_DICOMWEB_USERNAME", "")
    with pytest.raises(ValueError, match="dicomweb_password_file needs --conf dicomweb_user"):
        PacsDatastore(chain.pacs.dicomweb, AppSettings.from_conf({"dicomweb_password_file": str(password)}), {}, None)


def test_the_cache_json_is_replaced_whole_and_a_lost_one_still_checks_modalities(
    chain: Chain, tmp_path: Path, monkeypatch
) -> None:
    """The cache's JSON is written atomically (MONAI Label rewrites it in place); when it is lost anyway (or was
    written by an older app), a cached series' Modality is asked of the PACS instead of refusing every series."""
    cache, wide = str(tmp_path / "cache"), _pacs_settings(chain, tmp_path, monkeypatch)
    store = PacsDatastore(chain.pacs.dicomweb, wide, {}, None, cache)
    for kind in ("ct", "mr"):
        store.get_image_uri(chain.series[kind])
    config = Path(store._datastore_config_path)
    written = config.read_text()

    def crash(source: str, dest: str) -> None:
        raise OSError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(safe_paths.os, "replace", crash)
        with pytest.raises(OSError, match="killed"):
            store._update_datastore_file()
    assert config.read_text() == written and not list(config.parent.glob(f"{safe_paths.TEMP_PREFIX}*"))
    config.write_text(written[: len(written) // 2])  # cut by a crash of an older app
    mr_only = _pacs_settings(chain, tmp_path, monkeypatch, dicomweb_modalities="mr")
    narrowed = PacsDatastore(chain.pacs.dicomweb, mr_only, {}, None, cache)
    assert narrowed.get_image_uri(chain.series["mr"]).endswith(".nii.gz")
    with pytest.raises(ImageNotFoundException, match="is CT: this server serves MR series only"):
        narrowed.get_image_uri(chain.series["ct"])


def test_series_fetches_of_a_killed_server_are_removed_at_start_up(chain: Chain, tmp_path: Path, monkeypatch) -> None:
    """A server killed while downloading a series leaves a partial folder in the cache (a CT can be hundreds of MB);
    the next start removes it, and leaves alone a live server's download."""
    import subprocess

    from lib.safe_paths import TEMP_PREFIX

    settings = _pacs_settings(chain, tmp_path, monkeypatch)
    store = PacsDatastore(chain.pacs.dicomweb, settings, {}, load_vocabulary(), str(tmp_path / "cache"))
    images = Path(store._datastore.image_path())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = images / f"{TEMP_PREFIX}{int(gone.stdout)}-0123456789ab"
    live = images / f"{TEMP_PREFIX}{os.getpid()}-ba9876543210"
    for folder in (killed, live):
        folder.mkdir()
        (folder / "1.dcm").write_bytes(b"partial")
    PacsDatastore(chain.pacs.dicomweb, settings, {}, load_vocabulary(), str(tmp_path / "cache"))
    assert not killed.exists() and (live / "1.dcm").is_file()


def test_a_failed_conversion_copy_leaves_nothing_in_the_cache(chain: Chain, tmp_path: Path, monkeypatch) -> None:
    """The converted series enters the cache atomically: a copy that fails half-way (disk full, a kill) leaves no
    truncated file that later requests would trust, and the next request converts it again."""
    import shutil

    from lib import safe_paths

    settings = _pacs_settings(chain, tmp_path, monkeypatch)
    store = PacsDatastore(chain.pacs.dicomweb, settings, {}, load_vocabulary(), str(tmp_path / "cache"))
    uid = chain.series["ct"]

    def disk_full(source, target, length=0) -> None:  # noqa: ANN001, ARG001
        target.write(source.read(1000))
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(safe_paths.shutil, "copyfileobj", disk_full)
        with pytest.raises(OSError, match="No space left"):
            store.get_image_uri(uid)
    images = Path(store._datastore.image_path())
    assert not (images / f"{uid}.nii.gz").exists()
    assert not [p for p in images.iterdir() if p.name.startswith(safe_paths.TEMP_PREFIX)]
    assert shutil.copyfileobj is not disk_full
    assert read_image(store.get_image_uri(uid)).array.shape == read_image(chain.folders["ct"]).array.shape
    assert not store._fetching  # the per-series locks are dropped once fetched, failed or not


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_infer_by_series_uid_and_dicom_seg_out(chain: Chain, tmp_path: Path) -> None:
    client = MONAILabelClient(chain.url)
    truth = read_image(chain.labels["ct"]).array == 1
    nrrd, result = client.infer("medsam3_auto", chain.series["ct"], {"labels": "liver", "result_extension": ".nrrd"})
    answered = read_image(nrrd)
    assert answered.shape == read_image(chain.folders["ct"]).shape and result["label_names"]["liver"] == 1
    # The previous demo model on this held-out phantom: liver Dice 0.648 from the PACS, as from the same phantom in a
    # NIfTI or a local DICOM folder (measured); a flipped or swapped axis on the way would fall far below.
    assert _dice(answered.array == 1, truth) > 0.6
    seg_file, _ = client.infer("medsam3_auto", chain.series["ct"], {"labels": "liver", "result_extension": ".dcm"})
    seg = pydicom.dcmread(seg_file)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == chain.series["ct"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    reference = read_image(chain.folders["ct"])
    assert np.array_equal(read_seg(seg, reference, {"liver": 1}), answered.array)


def test_submitted_label_lands_in_the_pacs_as_a_coded_seg(chain: Chain) -> None:
    client = MONAILabelClient(chain.url)
    truth = read_image(chain.labels["mr"]).array.astype(np.uint8)
    mask = np.where(np.isin(truth, (1, 3)), np.where(truth == 1, 1, 2), 0).astype(np.uint8)
    upload = chain.root / "mr_label.nii.gz"
    reference = read_image(chain.folders["mr"])
    write_label(mask, reference, upload)
    info = {"label_info": [{"name": "liver", "idx": 1}, {"name": "right kidney", "idx": 2}]}  # Slicer's payload
    client.save_label(chain.series["mr"], str(upload), tag="final", params=info)
    segs = chain.pacs.series("SEG")
    assert len(segs) == 1
    (stored,) = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(b)) for b in chain.pacs.instance_files(_uid(segs[0]))]
    assert stored.ReferencedSeriesSequence[0].SeriesInstanceUID == chain.series["mr"]
    assert stored.StudyInstanceUID == pydicom.dcmread(str(sorted(chain.folders["mr"].iterdir())[0])).StudyInstanceUID
    segments = {s.SegmentLabel: s for s in stored.SegmentSequence}
    assert sorted(segments) == ["liver", "right kidney"]
    vocabulary = load_vocabulary()
    kidney = segments["right kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue) == ("64033007", "24028007")
    assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == vocabulary.by_index[1].snomed.type[0]
    decoded = read_seg(stored, reference, {"liver": 1, "right kidney": 2})
    assert np.array_equal(decoded, mask)  # voxel for voxel, in the series' grid
    kept = requests.get(
        f"{chain.url}/datastore/label", params={"label": chain.series["mr"], "tag": "final"}, timeout=60
    )
    copy = chain.root / "kept_label.nii.gz"
    copy.write_bytes(kept.content)
    assert kept.status_code == 200 and np.array_equal(read_image(copy).array, mask)  # what fine-tuning reads


def _uid(found: dict) -> str:
    return found["0020000E"]["Value"][0]


BAD = {
    "missing slices": (bad_dicom.missing_slices, "missing"),
    "inconsistent spacing": (bad_dicom.uneven_spacing, "spacing"),
    "enhanced multi-frame CT with a gap": (lambda good, out: bad_dicom.enhanced_ct(good, out, drop=(5, 6)), "missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dicom_gets_a_clear_4xx(chain: Chain, case: str) -> None:
    make, words = BAD[case]
    folder = make(chain.folders["ct"], chain.root / "bad" / case.replace(" ", "_"))
    chain.pacs.upload(sorted(folder.iterdir()))
    uid = _series_uid(folder)
    answer = requests.post(f"{chain.url}/infer/medsam3_auto?image={uid}", data={"params": '{"labels": "liver"}'})
    assert answer.status_code == 400 and words in answer.json()["detail"].lower(), answer.text
    assert requests.get(f"{chain.url}/info/", timeout=10).status_code == 200


def test_non_image_series_are_not_listed_nor_segmented(chain: Chain) -> None:
    time.sleep(1.5)  # past the cache time: the earlier tests' uploads are listed
    before = _total(chain.url)
    for make in (bad_dicom.sr_document, bad_dicom.segmentation):
        folder = make(chain.folders["ct"], chain.root / "bad" / make.__name__)
        chain.pacs.upload(sorted(folder.iterdir()))
        time.sleep(1.5)  # past the cache time
        assert _total(chain.url) == before
        answer = requests.post(f"{chain.url}/infer/medsam3_auto?image={_series_uid(folder)}", data={"params": "{}"})
        assert answer.status_code == 400 and "not an image" in answer.json()["detail"], answer.text
    unknown = requests.post(f"{chain.url}/infer/medsam3_auto?image=1.2.3.4", data={"params": "{}"})
    assert unknown.status_code == 404 and "No series" in unknown.json()["detail"]


def test_ids_are_series_uids_never_paths(chain: Chain) -> None:
    """A client's image id names a file in the cache: a path, or anything but a UID, is not found; labels go to
    the tag's own folder; images come from the PACS, not from uploads."""
    outside = chain.root / "secret.nii.gz"
    outside.write_bytes(chain.labels["ct"].read_bytes())
    for image in (str(outside).removesuffix(".nii.gz"), "../../secret", "1.2.3", "１.２"):
        answer = requests.get(f"{chain.url}/datastore/image", params={"image": image}, timeout=30)
        assert answer.status_code == 404, (image, answer.status_code)
    label = {"label": ("l.nii.gz", chain.labels["ct"].read_bytes())}
    escape = requests.put(
        f"{chain.url}/datastore/label", params={"image": chain.series["ct"], "tag": "../../escaped"}, files=label
    )
    assert escape.status_code == 400 and not list(chain.root.rglob("escaped*")), escape.text
    wrong_grid = requests.put(
        f"{chain.url}/datastore/label",
        params={"image": chain.series["ct"], "tag": "final"},
        files={"label": ("l.nii.gz", chain.labels["mr"].read_bytes())},
    )
    assert wrong_grid.status_code == 400 and "not on its image's grid" in wrong_grid.text, wrong_grid.text
    image = {"file": ("x.nii.gz", chain.labels["ct"].read_bytes())}
    upload = requests.put(f"{chain.url}/datastore/image", params={"image": "x"}, files=image, timeout=30)
    assert upload.status_code == 400 and "store them there" in upload.text, upload.text


def test_empty_label_prompt_runs_the_default_set(chain: Chain) -> None:
    """OHIF's Class tab with nothing ticked, and its Auto: the CT set among the offered labels, not a 400."""
    client = MONAILabelClient(chain.url)
    _, result = client.infer("medsam3_vista3d", chain.series["ct"], {"label_prompt": [], "result_extension": ".nrrd"})
    assert [row["name"] for row in result["labels"]] == AutoLabels.load().names("CT")  # the abdominal CT set


def test_a_pacs_that_does_not_answer_is_a_502(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    for url, _ in server_process(
        tmp_path, dead, free_port(), "--conf", "model_size", "tiny", "--conf", "ckpt_path", "random"
    ):
        stats = requests.get(f"{url}/datastore/?output=stats", timeout=60)
        infer = requests.post(f"{url}/infer/medsam3_auto?image=1.2.3", data={"params": "{}"}, timeout=60)
        info = requests.get(f"{url}/info/", timeout=60)  # Slicer's connect: lists the datastore too
        for answer in (stats, infer, info):
            assert answer.status_code == 502 and "The PACS did not answer" in answer.json()["detail"], answer.text
        proxied = requests.get(f"{url}/proxy/dicom/qido/studies", timeout=60)  # OHIF's study list
        assert proxied.status_code == 502 and "could not be reached" in proxied.json()["detail"], proxied.text
        for climb in ("qido/..%2F..%2Ftools%2Fnow", "%252e%252e/tools/now", "qido/%252e%252e/%252e%252e/system"):
            climbing = requests.get(f"{url}/proxy/dicom/{climb}", timeout=60)  # Orthanc's REST API, decoded twice
            assert climbing.status_code == 400 and "leaves the PACS's DICOMweb root" in climbing.json()["detail"]
        assert requests.get(f"{url}/docs", timeout=10).status_code == 200  # still serving


def test_a_pacs_that_hangs_is_a_502_after_the_timeout(tmp_path: Path) -> None:
    """A PACS that accepts connections and never answers: each request gives up after ``dicomweb_timeout`` (and its
    one retry) with a 502 naming the timeout, instead of holding the client and a worker thread for good."""
    import socket

    with socket.socket() as hanging:
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)  # connections complete in the backlog; nothing ever reads or answers them
        pacs = f"http://127.0.0.1:{hanging.getsockname()[1]}/dicom-web"
        conf = ["--conf", "model_size", "tiny", "--conf", "ckpt_path", "random", "--conf", "dicomweb_timeout", "1"]
        for url, _ in server_process(tmp_path, pacs, free_port(), *conf):
            start = time.monotonic()
            stats = requests.get(f"{url}/datastore/?output=stats", timeout=60)
            assert time.monotonic() - start < 15
            assert stats.status_code == 502 and "ReadTimeout" in stats.json()["detail"], stats.text
            infer = requests.post(f"{url}/infer/medsam3_auto?image=1.2.3", data={"params": "{}"}, timeout=60)
            assert infer.status_code == 502, infer.text
            assert requests.get(f"{url}/docs", timeout=10).status_code == 200  # still serving
            # OHIF's proxy: a 504 after the timeout, and the server answers other requests while it waits
            with ThreadPoolExecutor(1) as pool:
                proxied = pool.submit(requests.get, f"{url}/proxy/dicom/qido/studies", timeout=30)
                time.sleep(0.2)
                assert requests.get(f"{url}/docs", timeout=5).status_code == 200
                assert not proxied.done()  # answered while the proxied request still waited for the PACS
                answer = proxied.result()
            assert answer.status_code == 504 and "within 1 s" in answer.json()["detail"], answer.text
