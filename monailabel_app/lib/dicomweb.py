"""A DICOMweb PACS (Orthanc, DCM4CHEE, Google Healthcare...) as the app's datastore (``--studies http(s)://...``).

MONAI Label's DICOMweb datastore, with what a hospital needs changed:

* every image series is listed (CT, MR, PT, ...), not only ``Modality=CT``; ``--conf dicomweb_modalities`` narrows
  what is listed and what is served (a series of another modality is a 404 even when asked by its UID);
* the series list is cached for ``--conf dicomweb_cache_seconds`` (30), not two hours, so new studies appear;
* a downloaded series is checked (missing slices, uneven spacing, multi-frame, SR/SEG...) and converted by the
  bundle's reader: a bad series is a 400 naming the problem, an unknown one a 404;
* a final label goes to the PACS as a DICOM SEG whose segments carry the label names and their SNOMED CT codes
  (:mod:`scripts.dicom_seg`), instead of ``Segment_N`` coded as spleen.

PACS credentials: ``--conf dicomweb_user`` and ``--conf dicomweb_password_file`` (or MONAI Label's
``MONAI_LABEL_DICOMWEB_USERNAME`` / ``MONAI_LABEL_DICOMWEB_PASSWORD``); OHIF's ``/proxy/dicom`` uses the same ones.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from monailabel.config import settings as monailabel_settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import binary_to_image
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
from pydicom import Dataset

from scripts.dicom_seg import segments_by_value, write_seg
from scripts.dicom_series import NOT_IMAGES
from scripts.image_io import ImageVolume, read_image
from scripts.image_writing import write_image
from scripts.vocabulary import Vocabulary

from .datastore import check_label_file, checked_info, register_image, write_datastore_file
from .label_info import names_by_value
from .safe_paths import TEMP_PREFIX, check_name, remove_stale_temp_files
from .settings import AppSettings, names

logger = logging.getLogger(__name__)

SERIES_UID, STUDY_UID, MODALITY = "0020000E", "0020000D", "00080060"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
PAGE_SIZE, MAX_PAGES = 1000, 1000  # QIDO pages of the series listing, and at most this many


@dataclass
class _Fetching:
    """The lock of one series being fetched, and how many requests hold or wait for it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class PacsDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with image-only listing, a short cache, checked series and coded SEGs."""

    def __init__(
        self,
        url: str,
        settings: AppSettings,
        label_values: dict[str, int],
        vocabulary: Vocabulary,
        cache_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.label_values = label_values
        self.vocabulary = vocabulary
        self.modalities = {m.upper() for m in names(settings.dicomweb_modalities)}
        self._listing: tuple[float, list[str]] = (float("-inf"), [])
        self._labelled: tuple[float, list[str]] = (float("-inf"), [])
        self._lock = threading.Lock()
        self._fetching: dict[str, _Fetching] = {}  # one per series being fetched
        self.session = _session(settings)  # OHIF's proxy uses its credentials too (lib/dicomweb_proxy.py)
        client = DICOMwebClientX(
            url=url,
            session=self.session,
            qido_url_prefix=monailabel_settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=monailabel_settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=monailabel_settings.MONAI_LABEL_STOW_PREFIX,
        )
        # dicomweb_client retries any failure 5 times with back-off (about 30 s): a PACS that is down would hang every
        # request; one retry after 0.25 s covers a busy PACS's 503, then the client gets a 502 (lib/errors.py).
        client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)
        super().__init__(client, search_filter={}, cache_path=cache_path or None, fetch_by_frame=False)
        for removed in remove_stale_temp_files([self._datastore.image_path()]):
            logger.warning("Removed %s, left by a server that was stopped while fetching a series", removed)

    def _update_datastore_file(self, lock: bool = True) -> None:
        write_datastore_file(self, lock)  # atomic, unlike MONAI Label's

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Load the cache's JSON. One cut by a crash (MONAI Label wrote it in place) would stop the server from
        starting; it is kept as ``.corrupt`` instead, and the records are rebuilt from the cached files (their
        Modality is then asked of the PACS, :meth:`get_image_uri`)."""
        try:
            super()._init_from_datastore_file(throw_exception=True)
        except ValueError as error:
            config = self._datastore_config_path
            os.replace(config, f"{config}.corrupt")
            logger.warning("The PACS cache's %s was unreadable (%s): kept as .corrupt, rebuilt", config, error)

    def _fresh(self, cached: tuple[float, list[str]]) -> bool:
        return time.monotonic() - cached[0] < self.settings.dicomweb_cache_seconds

    def list_images(self) -> list[str]:
        """Image series UIDs, asked again once ``dicomweb_cache_seconds`` have passed."""
        with self._lock:
            if self._fresh(self._listing):
                return self._listing[1]
        series = []
        for found in self._every_series():
            uid = _value(found, SERIES_UID)
            kind = _modality(found)
            if uid and kind not in NOT_IMAGES and (not self.modalities or kind in self.modalities):
                series.append(uid)
        with self._lock:
            self._listing = (time.monotonic(), series)
        return series

    def _every_series(self) -> list[dict[str, Any]]:
        """The PACS's series, page by page. dicomweb_client's own paging asks until a page comes back empty, so a
        PACS that ignores ``offset`` (answering the first page again) kept a request spinning for good; a page
        shorter than asked, or with nothing new, ends the listing here."""
        found: dict[str, dict[str, Any]] = {}
        for _ in range(MAX_PAGES):
            page = self._client.search_for_series(search_filters={}, limit=PAGE_SIZE, offset=len(found))
            new = {_value(s, SERIES_UID): s for s in page if _value(s, SERIES_UID) not in found}
            found.update(new)
            if len(page) < PAGE_SIZE or not new:
                return list(found.values())
        logger.warning("The PACS listed more than %d series: the rest are not offered", len(found))
        return list(found.values())

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Series with a SEG in the PACS (one metadata request per SEG), cached as the series list is. A SEG whose
        metadata names no referenced series is skipped with a warning: MONAI Label's listing failed on it, and with
        it ``/info`` and the datastore for every user."""
        with self._lock:
            if self._fresh(self._labelled):
                return self._labelled[1]
        images, labelled = set(self.list_images()), []
        for seg in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            uid = _value(seg, SERIES_UID)
            try:
                meta = self._client.retrieve_series_metadata(_value(seg, STUDY_UID), uid)
                referenced = str(Dataset.from_json(meta[0]).ReferencedSeriesSequence[0].SeriesInstanceUID)
            except (IndexError, KeyError, AttributeError, TypeError, ValueError) as error:
                logger.warning("Skipped SEG %s: its metadata names no referenced series (%r)", uid, error)
                continue
            if referenced in images:
                labelled.append(referenced)
            else:
                logger.info("SEG %s labels series %s, which this server does not serve", uid, referenced)
        with self._lock:
            self._labelled = (time.monotonic(), labelled)
        return labelled

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise ValueError("Images come from the PACS: store them there (this server only reads them)")

    def get_image_uri(self, image_id: str) -> str:
        """The series as a checked NIfTI in the cache, downloaded and converted once: requests run in parallel
        threads, so one lock per series keeps two clicks on a new series from fetching it twice while other series
        are served."""
        if not _is_uid(image_id):  # never a path: the id names a file in the cache
            raise ImageNotFoundException(f"{image_id!r:.80} is not a SeriesInstanceUID")
        converted = Path(self._datastore.image_path()) / f"{image_id}.nii.gz"
        if converted.exists():  # fetched earlier, perhaps before dicomweb_modalities was narrowed
            cached = self._datastore.objects.get(image_id)
            kind = cached.image.info.get("Modality", "") if cached else ""
            if not kind and self.modalities:  # not recorded (a cache JSON lost or written by an older app): ask
                found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
                kind = _modality(found[0]) if found else ""
            self._check_modality(image_id, kind)
            return str(converted)
        with self._lock:
            fetching = self._fetching.setdefault(image_id, _Fetching())
            fetching.users += 1
        try:
            with fetching.lock:
                if not converted.exists():
                    self._fetch(image_id, converted)
        finally:
            with self._lock:  # dropped by its last user: a lock per series ever asked would grow without bound
                fetching.users -= 1
                if not fetching.users:
                    del self._fetching[image_id]
        return str(converted)

    def _fetch(self, image_id: str, converted: Path) -> None:
        image_path = converted.parent
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        if not found:
            raise ImageNotFoundException(f"No series {image_id!r:.80} in the PACS")
        self._check_modality(image_id, _modality(found[0]))
        series_dir = image_path / image_id
        if not series_dir.is_dir() or not any(series_dir.iterdir()):
            self._download(found[0], image_id, series_dir)
        volume = read_image(series_dir, max_voxels=self.settings.max_voxels)  # ValueError (400) for a bad series
        with tempfile.TemporaryDirectory() as work:
            written = write_image(volume.array, volume, Path(work) / f"{image_id}.nii.gz")
            # Atomic: a server killed while copying leaves no truncated file that later requests would trust.
            register_image(self, image_id, str(written), str(converted), ".nii.gz", self._dicom_info(image_id))

    def _download(self, series: dict[str, Any], uid: str, folder: Path) -> None:
        """Every instance of the series ``uid`` (``series``: its QIDO answer), into ``folder`` all at once: never
        a half-downloaded series in the cache. Files are named by their place in the answer, never by a name the
        PACS gives: MONAI Label's download names them ``<SOPInstanceUID>.dcm``, and a UID such as ``../../x``
        wrote outside the cache."""
        study = _value(series, STUDY_UID)
        if not _is_uid(study):
            raise ImageNotFoundException(f"The PACS gives series {uid} no valid StudyInstanceUID ({study!r:.80})")
        partial = folder.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"  # removed at start-up if killed
        partial.mkdir(mode=0o700)
        try:
            for number, instance in enumerate(self._client.retrieve_series(study, uid)):
                instance.save_as(str(partial / f"{number:06d}.dcm"))
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def _check_modality(self, image_id: str, kind: str) -> None:
        """Serve only the modalities ``--conf dicomweb_modalities`` lists (all when empty); SR, SEG and other
        non-images pass here and are refused by the series check with a 400 that says so."""
        kind = kind.upper()
        if self.modalities and kind not in NOT_IMAGES and kind not in self.modalities:
            raise ImageNotFoundException(
                f"Series {image_id} is {kind or 'of no modality'}: this server serves "
                f"{', '.join(sorted(self.modalities))} series only (--conf dicomweb_modalities)"
            )

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A label submitted through this server from the cache, where it was kept with its ``label_info``;
        otherwise MONAI Label's way (a SEG fetched from the PACS)."""
        local = LocalDatastore.get_label_uri(self, label_id, label_tag)
        if local and os.path.isfile(local):
            return local
        if not _is_uid(label_id):
            raise LabelNotFoundException(f"No label {label_id!r:.80}: a PACS label is a SEG's SeriesInstanceUID")
        label_dir = Path(self._datastore.label_path(label_tag)) / label_id
        if not label_dir.is_dir() or not any(label_dir.iterdir()):  # not downloaded yet: ask the PACS once
            found = [f for f in self._client.search_for_series(search_filters={"SeriesInstanceUID": label_id}) if f]
            if not found or _modality(found[0]) != "SEG":  # any other series would be copied into the label cache
                raise LabelNotFoundException(f"No DICOM SEG {label_id} in the PACS")
            self._download(found[0], label_id, label_dir)
        return super().get_label_uri(label_id, label_tag, image_id)  # converts the SEG it finds downloaded

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """A final label also goes to the PACS as a SEG named and coded from ``label_info`` or the app's labels."""
        check_name(label_tag, "label_tag")  # a folder name in the cache
        label_info = checked_info(label_info, "Label not saved")
        image_uri = self.get_image_uri(image_id)
        converted = ""
        if "".join(Path(label_filename).suffixes) == ".bin":  # OHIF's raw uint8 upload
            converted = label_filename = binary_to_image(image_uri, label_filename)
        try:
            label = check_label_file(label_filename, image_uri, self.settings.max_voxels)
            if label_tag == DefaultLabelTag.FINAL:
                label_info = {**label_info, **self._store_seg(image_id, label, label_info)}
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            if converted:
                os.unlink(converted)

    def _store_seg(self, image_id: str, label: ImageVolume, label_info: dict[str, Any]) -> dict[str, str]:
        series_dir = Path(self._datastore.image_path()) / image_id
        reference = read_image(series_dir, max_voxels=self.settings.max_voxels)
        named = names_by_value(label_info.get("label_info"), self.label_values)
        segments = segments_by_value(named, self.vocabulary)
        with tempfile.TemporaryDirectory() as work:
            seg = write_seg(label.array, reference, series_dir, segments, Path(work) / "seg.dcm")
            seg_series = dicom_web_upload_dcm(str(seg), self._client)
        info = self._dicom_info(image_id)
        logger.info("Stored DICOM SEG %s for series %s in the PACS", seg_series, image_id)
        return {"SeriesInstanceUID": seg_series, **{k: info[k] for k in ("Modality", "PatientID", "StudyInstanceUID")}}


def _modality(found: dict[str, Any]) -> str:
    """The Modality of a QIDO-RS series result, upper case ('' when the PACS does not say)."""
    return _value(found, MODALITY).upper()


def _value(found: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON answer ('' when absent)."""
    return str((found.get(tag, {}).get("Value") or [""])[0])


def _is_uid(text: str) -> bool:
    """A DICOM UID: ASCII digits in dot-separated parts, at most 64 characters."""
    return isinstance(text, str) and len(text) <= 64 and bool(_UID.fullmatch(text))


class _PacsSession(requests.Session):
    """An HTTP session whose requests give up after ``timeout`` seconds without an answer: ``requests`` waits
    forever by default, so a PACS that accepts a connection and never answers would hold a worker thread for good."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


def _session(settings: AppSettings) -> _PacsSession:
    """An HTTP session with the PACS timeout and credentials; the credentials also go to MONAI Label's settings,
    where its other DICOMweb code reads them."""
    session = _PacsSession(settings.dicomweb_timeout)
    user = settings.dicomweb_user or monailabel_settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = monailabel_settings.MONAI_LABEL_DICOMWEB_PASSWORD
    if settings.dicomweb_password_file:
        try:
            password = Path(settings.dicomweb_password_file).read_text().strip()
        except OSError as error:
            raise ValueError(f"--conf dicomweb_password_file: cannot read it ({error})") from error
    if not user:
        if settings.dicomweb_password_file:
            raise ValueError("--conf dicomweb_password_file needs --conf dicomweb_user")
        return session
    if not password:
        raise ValueError("--conf dicomweb_user needs a password: --conf dicomweb_password_file <file>")
    monailabel_settings.MONAI_LABEL_DICOMWEB_USERNAME = user
    monailabel_settings.MONAI_LABEL_DICOMWEB_PASSWORD = password
    session.auth = (user, password)
    return session
