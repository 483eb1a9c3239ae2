"""The app's datastore: atomic writes, a lost JSON recovered, names and files kept in the studies folder (unit
tests, then a real server sent traversal requests and killed while saving a label)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel_server import free_port, server_process, studies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))

from lib import safe_paths  # noqa: E402
from lib.datastore import SafeLocalDatastore, SafeSessions, readable_image  # noqa: E402
from lib.safe_paths import TEMP_PREFIX, UnsafePath  # noqa: E402

EXTENSIONS = ["*.nii.gz", "*.nrrd", "*.nhdr", "*.mhd", "*.mha"]
BAD_NAMES = ["../../x", "/tmp/x", "a/b", "a\\b", "..", ".", "x\x00y", "x\ny", "n" * 256, f"{TEMP_PREFIX}1-ab"]


def _open(folder: Path) -> SafeLocalDatastore:
    return SafeLocalDatastore(str(folder), extensions=EXTENSIONS, auto_reload=False)


def _nifti(shape: tuple[int, ...] = (8, 6, 4), seed: int | None = None, compress: bool = True) -> bytes:
    """A NIfTI file's bytes: zeros (an image), or with ``seed`` random label values 0-3 (a label on its grid)."""
    values = np.zeros(shape, np.uint8) if seed is None else np.random.default_rng(seed).integers(0, 4, shape, np.uint8)
    data = nib.Nifti1Image(values, np.diag([1.5, 1.5, 3.0, 1.0])).to_bytes()
    return gzip.compress(data, compresslevel=1) if compress else data


IMAGE = _nifti()


@pytest.fixture
def folder(tmp_path) -> Path:
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "ct.nii.gz").write_bytes(IMAGE)
    return tmp_path / "studies"


def _upload(tmp_path: Path, data: bytes | str, name: str = "label.nii.gz") -> str:
    (tmp_path / "upload").mkdir(exist_ok=True)
    path = tmp_path / "upload" / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _temp_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("failing", ["copy", "replace"])
def test_failed_label_write_keeps_the_old_label(folder, tmp_path, monkeypatch, failing) -> None:
    store = _open(folder)
    old, new = _nifti(seed=1), _nifti(seed=2)
    store.save_label("ct", _upload(tmp_path, old), "final", {"model": "first"})
    config = (folder / "datastore_v2.json").read_text()

    def fail(source, dest, length=0) -> None:
        if failing == "copy":
            dest.write(source.read(len(new) // 2))  # half of the new label, then the crash
        raise OSError("disk full")

    target = (safe_paths.shutil, "copyfileobj") if failing == "copy" else (safe_paths.os, "replace")
    monkeypatch.setattr(*target, fail)
    with pytest.raises(OSError, match="disk full"):
        store.save_label("ct", _upload(tmp_path, new), "final", {"model": "second"})
    assert (folder / "labels" / "final" / "ct.nii.gz").read_bytes() == old
    assert (folder / "datastore_v2.json").read_text() == config and not _temp_files(folder)
    if failing == "replace":
        with pytest.raises(OSError, match="disk full"):
            store.update_label_info("ct", "final", {"checked": True})  # a JSON write that fails
        assert (folder / "datastore_v2.json").read_text() == config and not _temp_files(folder)


def test_temp_files_of_dead_writers_are_removed_at_start(folder) -> None:
    _open(folder)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = f"{TEMP_PREFIX}{finished.stdout.strip()}-ab12", f"{TEMP_PREFIX}{os.getpid()}-cd34"
    for path in (folder / dead, folder / "labels" / "final" / dead, folder / live):
        path.write_bytes(b"partial")
    _open(folder)
    assert _temp_files(folder) == [folder / live]  # a live writer's file is in use


@pytest.mark.parametrize(
    "damage", ["", '{"name": "new-dataset", "obj', "\x00" * 64, None], ids=["empty", "cut", "binary", "missing"]
)
def test_lost_datastore_json_is_restored_from_its_backup(folder, tmp_path, caplog, damage) -> None:
    store = _open(folder)
    store.save_label("ct", _upload(tmp_path, _nifti(seed=1)), "final", {"model": "medsam3", "user": "ann"})
    (folder / "later.nii.gz").write_bytes(b"image added after the backup")
    config = folder / "datastore_v2.json"
    config.unlink() if damage is None else config.write_text(damage)
    restored = _open(folder)
    assert restored.get_label_info("ct", "final")["user"] == "ann"
    assert sorted(restored.list_images()) == ["ct", "later"]
    assert "restored from its backup copy" in caplog.text
    assert json.loads(config.read_text())["objects"]["ct"]["labels"]["final"]["info"]["model"] == "medsam3"


def test_without_backup_the_datastore_is_rebuilt_from_the_files(folder, tmp_path, caplog) -> None:
    _open(folder).save_label("ct", _upload(tmp_path, _nifti(seed=1)), "final", {"user": "ann"})
    (folder / "datastore_v2.json").write_text("")
    (folder / ".datastore_v2.json.backup").write_text("{")
    rebuilt = _open(folder)
    assert rebuilt.get_labels_by_image_id("ct") == {"final": "ct"}
    assert "user" not in rebuilt.get_label_info("ct", "final")
    assert "rebuilt from the images and labels" in caplog.text and (folder / "datastore_v2.json.corrupt").exists()


BAD_INFO = {"NaN": '{"label_info": [{"name": "liver"}], "score": NaN}', "lone surrogate": '{"note": "\\ud800"}'}


@pytest.mark.parametrize("case", [*BAD_INFO, "not an object"])
def test_info_the_datastore_could_not_write_back_is_refused(folder, tmp_path, case) -> None:
    """Python's JSON reader takes NaN and lone surrogates; stored, they made the datastore file unreadable at the
    next start, and every label's info was lost. Nothing is written when they are refused."""
    store = _open(folder)
    store.save_label("ct", _upload(tmp_path, _nifti(seed=1)), "final", {"user": "ann"})
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    info = json.loads(BAD_INFO[case]) if case in BAD_INFO else [1]
    attempts = {
        "save_label": lambda: store.save_label("ct", _upload(tmp_path, _nifti(seed=2)), "final", info),
        "update_label_info": lambda: store.update_label_info("ct", "final", info),
        "update_image_info": lambda: store.update_image_info("ct", info),
        "add_image": lambda: store.add_image("new", _upload(tmp_path, IMAGE, "new.nii.gz"), info),
    }
    for name, attempt in attempts.items():
        with pytest.raises(ValueError, match="params must be"):
            attempt()
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before, name
    assert _open(folder).get_label_info("ct", "final")["user"] == "ann"


def _outside(tmp_path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "studies" not in p.parts}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_paths_in_names_are_refused(folder, tmp_path, name) -> None:
    store, image = _open(folder), _upload(tmp_path, b"image", "image.nii.gz")
    before = _outside(tmp_path)
    for call in (
        lambda: store.add_image(name, image, {}),
        lambda: store.save_label("ct", image, name, {}),
        lambda: store.save_label(name, image, "final", {}),
        lambda: store.remove_label("ct", name),
        lambda: store.remove_image(name),
    ):
        with pytest.raises(UnsafePath) as refused:
            call()
        assert str(tmp_path) not in refused.value.msg
    assert _outside(tmp_path) == before and (folder / "ct.nii.gz").read_bytes() == IMAGE
    assert SafeSessions(str(tmp_path / "sessions")).get_session(name) is None


def test_empty_tags_and_other_file_types_are_refused(folder, tmp_path) -> None:
    store = _open(folder)
    with pytest.raises(UnsafePath, match="label tag must be a non-empty string"):
        store.save_label("ct", _upload(tmp_path, b"label"), "", {})
    with pytest.raises(UnsafePath, match="file type '.py' is not accepted"):
        store.add_image("__init__", _upload(tmp_path, "import os", "x.py"), {})
    with pytest.raises(UnsafePath, match="file type '.html' is not accepted"):
        store.save_label("ct", _upload(tmp_path, "<script>", "x.html"), "final", {})
    assert not [path for path in folder.rglob("*") if path.suffix in (".py", ".html")]


def _float_label() -> bytes:
    return gzip.compress(nib.Nifti1Image(np.full((8, 6, 4), 0.5, np.float32), np.diag([1.5, 1.5, 3.0, 1.0])).to_bytes())


BAD_LABELS = {
    "not a NIfTI file": (b"label", "Label not saved: Cannot read image the label file"),
    "cut short": (_nifti(seed=1)[:-40], "Label not saved: Cannot read image the label file"),
    "another shape": (_nifti((8, 6, 5), seed=1), "its shape [8, 6, 5] differs from the image's [8, 6, 4]"),
    "another spacing": (
        gzip.compress(nib.Nifti1Image(np.zeros((8, 6, 4), np.uint8), np.diag([1.5, 1.5, 2.0, 1.0])).to_bytes()),
        "its spacing [1.5, 1.5, 2.0] differs from the image's [1.5, 1.5, 3.0]",
    ),
    "fractions": (_float_label(), "Label values must be whole numbers"),
}


@pytest.mark.parametrize("case", BAD_LABELS)
def test_labels_that_are_not_label_maps_on_their_image_are_refused(folder, tmp_path, case) -> None:
    """A submitted label is read first: the annotator hears now why it is not saved, and the saved one stays."""
    store = _open(folder)
    store.save_label("ct", _upload(tmp_path, (good := _nifti(seed=1))), "final", {"user": "ann"})
    data, message = BAD_LABELS[case]
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        store.save_label("ct", _upload(tmp_path, data, "bad.nii.gz"), "final", {"user": "bob"})
    assert str(tmp_path) not in str(refused.value)
    assert (folder / "labels" / "final" / "ct.nii.gz").read_bytes() == good
    assert store.get_label_info("ct", "final")["user"] == "ann" and not _temp_files(folder)


def test_a_label_for_an_image_that_cannot_be_read_is_refused(folder, tmp_path) -> None:
    store = _open(folder)
    (folder / "ct.nii.gz").write_bytes(b"image")  # damaged on disk since it was added
    with pytest.raises(ValueError, match="Label not saved: Cannot read image its image") as refused:
        store.save_label("ct", _upload(tmp_path, _nifti(seed=1)), "final", {})
    assert str(tmp_path) not in str(refused.value) and not list((folder / "labels" / "final").glob("ct*"))


OUTSIDE_HEADERS = [
    ("x.nhdr", "NRRD0004\ntype: uint8\ndata file: /etc/hostname\n"),
    ("x.nhdr", "NRRD0004\ndatafile: ../../../outside.raw\n"),
    ("x.nhdr", "NRRD0004\ndata file: ../../../slice%03d.raw 1 3 1\n"),
    ("x.nhdr", "NRRD0004\ndata file: LIST\nct.raw\n../../../x.raw\n"),
    ("x.nrrd", "NRRD0004\ndata file: /etc/hostname\n\n"),  # a .nrrd can be a detached header too
    ("x.mhd", "NDims = 3\nElementDataFile = /etc/hostname\n"),
    ("x.mhd", "ElementDataFile = LIST\nct.raw\n/etc/hostname\n"),
    ("x.mha", "ElementDataFile=../../../x.raw\n"),
]
INSIDE_HEADERS = [
    ("x.nhdr", "NRRD0004\ndata file: x.raw\n"),
    ("x.nhdr", "NRRD0004\ndata file: LIST\na.raw\nlabels/b.raw\n"),
]
ATTACHED_DATA = [  # what follows the header is data, never read as a path: these are refused as no images instead
    ("x.mha", "NDims = 3\nElementDataFile = LOCAL\n\x00\x01/etc/hostname"),
    ("x.nrrd", "NRRD0004\nencoding: raw\n\n\x00data file: /etc/hostname\n"),
]


@pytest.mark.parametrize(("name", "header"), OUTSIDE_HEADERS)
def test_headers_naming_data_outside_are_refused(folder, tmp_path, name, header) -> None:
    store = _open(folder)
    with pytest.raises(UnsafePath, match="names a data file outside the studies folder"):
        store.add_image("x", _upload(tmp_path, header, name), {})
    with pytest.raises(UnsafePath, match="names a data file outside the studies folder"):
        store.save_label("ct", _upload(tmp_path, header, name), "final", {})
    (folder / name).write_text(header)  # placed by hand: not read either
    store.refresh()
    assert store.get_image_uri("x") == "" and not readable_image(str(folder / name), store, None)


@pytest.mark.parametrize(("name", "header"), INSIDE_HEADERS)
def test_headers_with_data_inside_are_accepted(folder, tmp_path, name, header) -> None:
    store = _open(folder)
    assert store.add_image("x", _upload(tmp_path, header, name), {}) == "x"
    uri = store.get_image_uri("x")
    assert uri == os.path.realpath(folder / name) and readable_image(uri, store, None)


@pytest.mark.parametrize(("name", "header"), ATTACHED_DATA)
def test_data_after_a_header_is_not_read_as_a_path(folder, tmp_path, name, header) -> None:
    with pytest.raises(ValueError, match="Image not added: Cannot read image the uploaded file") as refused:
        _open(folder).add_image("x", _upload(tmp_path, header, name), {})
    assert not isinstance(refused.value, UnsafePath)


BAD_IMAGES = {
    "not a NIfTI file": (b"image", "Cannot read image the uploaded file"),
    "cut short": (IMAGE[:-40], "Cannot read image the uploaded file"),
    "only a header": (_nifti(compress=False)[:352], "Cannot read image the uploaded file"),
    "over the voxel limit": (
        _nifti((80, 60, 40)),
        "the uploaded file claims 192,000 voxels (80 x 60 x 40), more than the limit of 100,000",
    ),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_images_that_cannot_be_read_are_refused_at_upload(folder, tmp_path, case) -> None:
    """An upload is read before it joins the datastore: the uploader hears why now, instead of an annotator or a
    training run meeting a broken image later; the datastore is left as it was."""
    store = SafeLocalDatastore(str(folder), extensions=EXTENSIONS, auto_reload=False, max_voxels=100_000)
    before = sorted(path.name for path in folder.rglob("*"))
    data, message = BAD_IMAGES[case]
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        store.add_image("new", _upload(tmp_path, data, "new.nii.gz"), {})
    assert str(refused.value).startswith("Image not added:") and str(tmp_path) not in str(refused.value)
    assert store.get_image_uri("new") == "" and sorted(path.name for path in folder.rglob("*")) == before
    assert store.add_image("new", _upload(tmp_path, IMAGE, "new.nii.gz"), {}) == "new"


def test_infer_reads_only_datastore_session_and_uploaded_images(folder, tmp_path) -> None:
    store, sessions = _open(folder), SafeSessions(str(tmp_path / "sessions"))
    (secret := tmp_path / "secret.nii.gz").write_bytes(b"secret")
    (tmp_path / "sessions" / "s1").mkdir(parents=True)
    (tmp_path / "sessions" / "s1" / "ct.nii.gz").write_bytes(b"session image")
    (tmp_path / "linked.nii.gz").write_bytes(b"an image kept elsewhere")
    (folder / "linked.nii.gz").symlink_to(tmp_path / "linked.nii.gz")  # a link the site made: a datastore image
    store.refresh()
    with tempfile.NamedTemporaryFile(suffix=".nii.gz") as upload:
        allowed = [f"{folder}/ct.nii.gz", f"{tmp_path}/sessions/s1/ct.nii.gz", upload.name, f"{tmp_path}/linked.nii.gz"]
        assert all(readable_image(image, store, sessions) for image in allowed)
        disguised = Path(tempfile.gettempdir()) / f"tmp{os.urandom(4).hex()}.nii.gz"
        disguised.symlink_to(secret)
        try:
            refused = [str(secret), str(tmp_path / "missing.nii.gz"), f"{folder}/../secret.nii.gz", str(disguised)]
            assert not any(readable_image(image, store, sessions) for image in refused + ["", "/etc/hostname"])
        finally:
            disguised.unlink()


def _tar(*members: tuple[str, str, str]) -> bytes:
    """A tar of (kind, name, link target) members; kind is file, dir, sym, hard or fifo."""
    types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for kind, name, target in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = types.get(kind, tarfile.FIFOTYPE), target
            info.size = 5 if kind == "file" else 0
            archive.addfile(info, io.BytesIO(b"dicom") if kind == "file" else None)
    return buffer.getvalue()


def _zip(name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, b"dicom")
    return buffer.getvalue()


BAD_ARCHIVES = {
    "parent": _tar(("file", "../../../x.dcm", "")),
    "absolute": _tar(("file", "/tmp/x.dcm", "")),
    "link out": _tar(("sym", "series/link", "/etc")),
    "link up": _tar(("sym", "series/link", "../..")),
    "hard link": _tar(("hard", "series/x", "../../etc/hostname")),
    "device": _tar(("fifo", "series/pipe", "")),
    "zip parent": _zip("../x.dcm"),
}


@pytest.mark.parametrize("kind", BAD_ARCHIVES)
def test_session_archives_leaving_their_folder_are_refused(tmp_path, kind) -> None:
    archive = Path(_upload(tmp_path, BAD_ARCHIVES[kind], "series.zip" if "zip" in kind else "series.tar.gz"))
    sessions = SafeSessions(str(tmp_path / "sessions"))
    with pytest.raises(UnsafePath, match="archive"):
        sessions.add_session(str(archive), uncompress=True)
    assert not (tmp_path / "sessions").exists() and not (tmp_path / "x.dcm").exists()
    good = _upload(
        tmp_path, _tar(("dir", "series", ""), ("file", "series/1.dcm", ""), ("sym", "one", "series/1.dcm")), "ok.tar.gz"
    )
    _, info = sessions.add_session(good, uncompress=True)
    assert (Path(info.image) / "one").read_bytes() == b"dicom"


CONF = ("--conf", "model_size", "tiny", "--conf", "checkpoint", "random")
BIG = (384, 384, 320)  # an uncompressed uint8 label of this grid is 47 MB: a kill can land while it is written


class Server:
    """A real server over one studies folder that a test may kill (``SIGKILL``) and start again."""

    def __init__(self, root: Path) -> None:
        self.root, self.runs = root, 0
        (root / "outer" / "in").mkdir(parents=True)
        self.studies = studies(root / "outer" / "in")  # "../../../x" from the studies folder is root/x
        self.start()

    def start(self) -> None:
        self.runs += 1
        (run := self.root / f"run{self.runs}").mkdir()
        self._running = server_process(run, self.studies, free_port(), *CONF)
        self.url, self.process = next(self._running)

    def stop(self) -> None:
        self._running.close()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.stop()  # waits for it

    def outside(self) -> dict[str, str]:
        """Every file under the test's folder but the studies, sessions, temp files and server logs."""
        skip = (self.studies, self.root / "sessions", self.root / "tmp", *self.root.glob("run*"))
        files = (p for p in self.root.rglob("*") if p.is_file() and not any(p.is_relative_to(s) for s in skip))
        return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("datastore")
    for folder in ("sentinel", "tmp"):
        (root / folder).mkdir()
    (root / "sentinel" / "secret.nii.gz").write_bytes(b"a file clients must not read")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MONAI_LABEL_SESSION_PATH", str(root / "sessions"))
        patch.setenv("TMPDIR", str(root / "tmp"))  # uploads a killed server leaves stay in the test's folder
        running = Server(root)
        running.before = running.outside()
        yield running
        running.stop()


def _put_image(url: str, image: str, name: str = "x.nii.gz", data: bytes = b"image") -> requests.Response:
    return requests.put(f"{url}/datastore/image", params={"image": image}, files={"file": (name, data)}, timeout=60)


def _put_label(
    url: str, tag: str, data: bytes = b"label", timeout: float = 60, image: str = "ct_ras", name: str = "label.nii.gz"
) -> requests.Response:
    files = {"label": (name, data)}
    return requests.put(f"{url}/datastore/label", params={"image": image, "tag": tag}, files=files, timeout=timeout)


def _infer(url: str, image: str, params: dict | None = None) -> requests.Response:
    data = {"params": json.dumps(params or {})}
    return requests.post(f"{url}/infer/medsam3_auto", params={"image": image}, data=data, timeout=120)


def _session(url: str, archive: bytes) -> requests.Response:
    return requests.put(f"{url}/session/?uncompress=true", files={"files": ("series.tar.gz", archive)}, timeout=60)


HTTP_CASES = {
    "image id ../../../x": lambda s: _put_image(s.url, "../../../x"),
    "absolute image id": lambda s: _put_image(s.url, f"{s.root}/sentinel/x"),
    "app code as an image": lambda s: _put_image(s.url, "__init__", "x.py", b"raise SystemExit"),
    "header naming a server file": lambda s: _put_image(s.url, "h", "h.nrrd", b"NRRD0004\ndata file: /etc/hostname\n"),
    "label tag ../../../x": lambda s: _put_label(s.url, "../../../x"),
    "label tag ..": lambda s: _put_label(s.url, ".."),
    "label tag a/b": lambda s: _put_label(s.url, "a/b"),
    "delete label tag ..": lambda s: requests.delete(f"{s.url}/datastore/label?id=ct_ras&tag=..", timeout=60),
    "infer save_label ../../x": lambda s: _infer(s.url, "ct_ras", {"save_label": 1, "label_tag": "../../x"}),
    "session member ../": lambda s: _session(s.url, _tar(("file", "../../sentinel/evil.dcm", ""))),
    "session absolute member": lambda s: _session(s.url, _tar(("file", f"{s.root}/sentinel/evil.dcm", ""))),
    "session link out": lambda s: _session(s.url, _tar(("sym", "series", f"{s.root}/sentinel"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", HTTP_CASES)
def test_paths_outside_the_studies_folder_get_400(server, case) -> None:
    response = HTTP_CASES[case](server)
    assert response.status_code == 400 and re.search("must not|reserved|not accepted|refused", response.text)
    assert str(server.root) not in response.text and "/etc" not in response.text


def test_an_image_cut_short_is_refused_at_upload(server) -> None:
    response = _put_image(server.url, "cut", "cut.nii.gz", IMAGE[:-40])
    assert response.status_code == 400 and "Image not added: Cannot read image the uploaded file" in response.text
    assert requests.get(f"{server.url}/datastore/image", params={"image": "cut"}, timeout=30).status_code == 404
    assert not list(server.studies.glob("cut*")) and not _temp_files(server.studies)
    assert _put_image(server.url, "whole", "whole.nii.gz", IMAGE).status_code == 200


@pytest.mark.slow
def test_infer_reads_no_file_outside_the_datastore(server) -> None:
    secret = f"{server.root}/sentinel/secret.nii.gz"
    answers = [_infer(server.url, image) for image in (secret, f"{secret}.missing", "../sentinel/secret.nii.gz")]
    answers.append(_infer(server.url, "ct_ras", {"image": secret}))
    answers.append(_infer(server.url, "ct_ras", {"image": "/etc/hostname"}))
    assert {(answer.status_code, answer.text) for answer in answers} == {(404, answers[0].text)}
    assert "not found in the datastore" in answers[0].text
    assert _infer(server.url, "ct_ras", {"labels": "liver"}).status_code == 200  # datastore images still are
    with Path(server.root / "sentinel" / "secret.nii.gz").open("rb") as upload:  # and uploads reach the reader
        response = requests.post(f"{server.url}/infer/medsam3_auto", files={"file": ("up.nii.gz", upload)}, timeout=60)
    assert response.status_code == 400 and "Cannot read image" in response.text


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put_big_label(url: str, data: bytes) -> requests.Response:
    return _put_label(url, "final", data, timeout=120, image="big", name="big.nii")


def _put_until_killed(url: str, data: bytes) -> None:
    try:
        _put_big_label(url, data)
    except requests.ConnectionError:
        pass  # the server was killed before it answered


@pytest.mark.slow
def test_a_kill_while_saving_a_label_leaves_the_old_or_the_new_one(server) -> None:
    assert server.outside() == server.before  # after the requests above, before the kills
    assert _put_image(server.url, "big", "big.nii.gz", _nifti(BIG)).status_code == 200
    folder = server.studies / "labels" / "final"
    label = folder / "big.nii"
    old = _nifti(BIG, seed=1, compress=False)
    assert _put_big_label(server.url, old).status_code == 200
    writing = {
        "while the new label is written": lambda inode: any(p.name.startswith(TEMP_PREFIX) for p in folder.iterdir()),
        "just after it replaced the old one": lambda inode: label.stat().st_ino != inode,
    }
    for seed, (moment, reached_with) in enumerate(writing.items(), start=2):
        new, inode = _nifti(BIG, seed=seed, compress=False), label.stat().st_ino
        saving = threading.Thread(target=_put_until_killed, args=(server.url, new), daemon=True)
        saving.start()
        deadline = time.time() + 120
        while not (reached := reached_with(inode)) and time.time() < deadline:
            time.sleep(0.0005)
        server.kill()
        assert reached, f"the save never got to {moment}"
        saving.join(timeout=60)
        server.start()
        on_disk = label.read_bytes()
        assert _digest(on_disk) in (_digest(old), _digest(new)), moment
        served = requests.get(f"{server.url}/datastore/label", params={"label": "big", "tag": "final"}, timeout=60)
        assert _digest(served.content) == _digest(on_disk)
        assert not _temp_files(server.studies), moment
        assert "final" in json.loads((server.studies / "datastore_v2.json").read_text())["objects"]["big"]["labels"]
        old = on_disk
    after = _nifti(BIG, compress=False)
    assert _put_big_label(server.url, after).status_code == 200
    assert label.read_bytes() == after
    refused = _put_big_label(server.url, b"not a label")  # read before it is saved: a 400 that says why
    assert refused.status_code == 400 and "Label not saved: Cannot read image" in refused.text, refused.text
    assert str(server.root) not in refused.text and label.read_bytes() == after
