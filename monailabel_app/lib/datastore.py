"""The app's datastore and sessions: MONAI Label's, with crash-safe writes and client names kept to their folder.

Every image, label and ``datastore_v2.json`` write is atomic (:func:`lib.safe_paths.atomic_write`). The JSON is
also written to a backup copy: a missing, empty or corrupt JSON is restored from it at start-up, else rebuilt from
the files as MONAI Label does for a new folder, so the server always starts. Image ids and label tags are single
names; files are written only below the studies folder (never into the app or bundle folders) and only with the
datastore's extensions; NRRD and MetaImage headers must keep their data in the studies folder. An uploaded image is
read before it is added and refused (400) when it cannot be (cut short, not an image, over the voxel limit); a
submitted label is read before it is saved and refused (400) unless it is a label map on its image's voxel grid.
The info a client sends with an image or label must be a JSON object that the datastore can write back as strict
JSON (:func:`checked_info`), or nothing is written.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException
from monailabel.utils.sessions import Sessions

from scripts.image_io import ImageVolume, read_image
from scripts.image_writing import check_label_volume

from .safe_paths import (
    UnsafePath,
    atomic_copy,
    atomic_write_text,
    check_archive,
    check_header,
    check_name,
    inside,
    remove_stale_temp_files,
)

logger = logging.getLogger(__name__)

_UPLOAD_NAME = re.compile(r"tmp[a-z0-9_]{8}[^/]*")  # tempfile's names, as MONAI Label's endpoints save uploads


class SafeLocalDatastore(LocalDatastore):
    """The studies folder as MONAI Label's local datastore, with the guarantees in this module's docstring.

    ``protected``: folders never written to even when the studies folder contains them (the app, the bundle).
    """

    def __init__(
        self,
        datastore_path: str,
        protected: Sequence[str] = (),
        datastore_config: str = "datastore_v2.json",
        images_dir: str = ".",
        labels_dir: str = "labels",
        max_voxels: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.root = os.path.realpath(datastore_path)
        self.max_voxels = max_voxels  # what a submitted label (and its image, read to check it) may claim
        os.makedirs(self.root, exist_ok=True)
        self._protected = [p for p in map(os.path.realpath, protected) if p != self.root and inside(p, self.root)]
        if self._protected:
            logger.warning("The studies folder contains the app or bundle folder: the datastore never writes there")
        self._backup_path = os.path.join(self.root, f".{datastore_config}.backup")
        self._remove_temp_files(os.path.join(self.root, images_dir), os.path.join(self.root, labels_dir))
        self._recover(os.path.join(self.root, datastore_config))
        super().__init__(self.root, images_dir, labels_dir, datastore_config, **kwargs)
        if getattr(self, "_handler", None) is not None:  # auto reload: another process's JSON arrives as a rename
            self._handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event: Any) -> None:
        """Reload when a JSON written by another process (the scoring or training subprocess) is renamed into place:
        with atomic writes that is a move, which MONAI Label's watcher (modifications only) would miss."""
        if os.path.realpath(getattr(event, "dest_path", "")) == os.path.realpath(self._datastore_config_path):
            self._on_modify_event(SimpleNamespace(src_path=self._datastore_config_path))

    def _remove_temp_files(self, images: str, labels: str) -> None:
        tags = [entry.path for entry in os.scandir(labels) if entry.is_dir()] if os.path.isdir(labels) else []
        removed = remove_stale_temp_files({os.path.normpath(path) for path in (self.root, images, labels, *tags)})
        if removed:
            logger.warning("Removed %d temporary file(s) left by interrupted writes: %s", len(removed), removed)

    def _recover(self, config: str) -> None:
        """Make ``config`` loadable: from the backup copy, else set it aside so the files rebuild it."""
        problem = _unreadable(config)
        if problem is None or (problem == "missing" and not os.path.exists(self._backup_path)):
            return  # sound, or a new datastore
        if _unreadable(self._backup_path) is None:
            atomic_copy(self._backup_path, config)
            logger.warning(
                "%s was %s: restored from its backup copy (label info as of the last save); "
                "images and labels added since then are found again from the files",
                os.path.basename(config),
                problem,
            )
            return
        if os.path.exists(config):
            os.replace(config, f"{config}.corrupt")
        logger.warning(
            "%s was %s and its backup unusable: rebuilt from the images and labels in the studies folder "
            "(label info such as the model or user that made a label is lost; the old file is kept as .corrupt)",
            os.path.basename(config),
            problem,
        )

    def _update_datastore_file(self, lock: bool = True) -> None:
        write_datastore_file(self, lock, backup=self._backup_path)

    def _file_name(self, image_id: str, ext: str, what: str) -> str:
        name = f"{image_id}{ext}"
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self._extensions):
            accepted = ", ".join(pattern.lstrip("*") for pattern in self._extensions)
            raise UnsafePath(f"{what} file type {ext or '(none)'!r} is not accepted; use one of {accepted}")
        return check_name(name, f"{what} file name")

    def _destination(self, folder: str, name: str) -> str:
        dest = os.path.join(folder, name)
        if not inside(dest, self.root) or any(inside(dest, protected) for protected in self._protected):
            raise UnsafePath("The file would be written outside the studies folder; it is refused")
        return dest

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_name(image_id or derived, "image id")
        name = self._file_name(image_id, ext, "image")
        folder = self._datastore.image_path()
        dest = self._destination(folder, name)
        image_info = checked_info(image_info, "Image not added")
        if not check_header(image_filename, folder, [self.root]):  # a detached header's data is read when used
            check_image_file(image_filename, self.max_voxels)
        logger.info("Adding image %s", image_id)
        register_image(self, image_id, image_filename, dest, ext, image_info)
        return image_id

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_name(image_id, "image id")
        label_tag = check_name(label_tag, "label tag")
        label_info = checked_info(label_info, "Label not saved")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, ext = self._to_id(os.path.basename(label_filename))
        name = self._file_name(image_id, ext, "label")
        folder = self._datastore.label_path(label_tag)
        dest = self._destination(folder, name)
        check_header(label_filename, folder, [self.root])
        check_label_file(label_filename, self.get_image_uri(image_id), self.max_voxels)
        logger.info("Saving label %s for image %s", label_tag, image_id)
        with FileLock(self._lock_file):
            os.makedirs(folder, exist_ok=True)
            atomic_copy(label_filename, dest)
            info = {**label_info, "ts": int(time.time()), "name": name}
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        super().update_image_info(check_name(image_id, "image id"), checked_info(info, "Image info not updated"))

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        label_id, label_tag = check_name(label_id, "image id"), check_name(label_tag, "label tag")
        super().update_label_info(label_id, label_tag, checked_info(info, "Label info not updated"))

    def remove_image(self, image_id: str) -> None:
        super().remove_image(check_name(image_id, "image id"))

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(check_name(label_id, "image id"), check_name(label_tag, "label tag"))

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        return uri if uri and self._data_inside(uri) else ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        uri = super().get_label_uri(label_id, label_tag)
        return uri if uri and self._data_inside(uri) else ""

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        pairs = super().datalist(full_path)
        return [p for p in pairs if all(self._data_inside(os.path.join(self.root, p[k])) for k in ("image", "label"))]

    def _data_inside(self, path: str) -> bool:
        """Whether a file on disk may be read: a header only with its data in the studies folder."""
        try:
            check_header(path, os.path.dirname(path), [self.root])
        except UnsafePath as error:
            logger.warning("Not reading %s: %s", path, error.msg)
            return False
        return True

    def owns_image(self, path: str) -> bool:
        """Whether ``path`` is one of the datastore's images (a link in the studies folder may point elsewhere)."""
        uri = super().get_image_uri
        return any(uri(image_id) == path for image_id in list(self._datastore.objects))


def register_image(store: LocalDatastore, image_id: str, source: str, dest: str, ext: str, info: dict | None) -> None:
    """Copy ``source`` to ``dest`` atomically (a file at ``dest`` is always whole) and record the image in the
    datastore's JSON, under its lock: the local studies folder and the PACS cache (lib/dicomweb.py) add images so."""
    with FileLock(store._lock_file):
        atomic_copy(source, dest)
        info = {**(info or {}), "ts": int(time.time()), "name": os.path.basename(dest)}
        store._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
        store._update_datastore_file(lock=False)


def write_datastore_file(store: LocalDatastore, lock: bool = True, backup: str = "") -> None:
    """Write ``store``'s JSON (and, when given, its ``backup`` copy) atomically: MONAI Label rewrites it in place, so
    a kill mid-write would leave a cut file. Used by this module's datastore and the PACS cache (lib/dicomweb.py)."""
    text = json.dumps(store._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
    with FileLock(store._lock_file) if lock else nullcontext():
        store._ignore_event_config = True  # our own write: not a reason to reload
        atomic_write_text(store._datastore_config_path, text)
        if backup:
            atomic_write_text(backup, text)
        store._config_ts = os.stat(store._datastore_config_path).st_mtime


def checked_info(info: Any, what: str) -> dict[str, Any]:
    """A client's image or label info as the datastore may keep it: a JSON object (``{}`` for none) that writes back
    as strict JSON. Python's JSON reader takes ``NaN`` and lone surrogates (``"\\ud800"``), which the datastore file
    cannot hold: stored, they would make the file unreadable at the next start and lose every label's info."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise ValueError(f"{what}: its params must be a JSON object, got {type(info).__name__}")
    try:
        json.dumps(info, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as error:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"{what}: its params must be strict JSON (no NaN or Infinity, valid text): {error}") from None
    return info


def check_image_file(image_path: str, max_voxels: int | None) -> None:
    """Refuse (``ValueError``: 400) an uploaded image that cannot be read, before annotators and training meet it.

    Not for a detached header: its data files are in the studies folder, not beside the upload.
    """
    try:
        read_image(image_path, max_voxels=max_voxels)
    except ValueError as error:  # server paths and temporary names mean nothing to the client
        reason = str(error).replace(image_path, "the uploaded file")
        reason = reason.replace(os.path.basename(image_path), "the uploaded file")
        raise ValueError(f"Image not added: {reason}") from None


def check_label_file(label_path: str, image_path: str, max_voxels: int | None) -> ImageVolume:
    """The label read, after refusing (``ValueError``: 400) one that cannot be read or is not a label map on its
    image's voxel grid, before it is saved: the annotator learns it at once, instead of training skipping it later."""
    try:
        if not image_path:
            raise ValueError("its image cannot be read")
        reference = read_image(image_path, max_voxels=max_voxels)
        label = read_image(label_path, max_voxels=max_voxels)
        check_label_volume(label, reference)
        return label
    except ValueError as error:  # server paths mean nothing to the client
        reason = str(error).replace(label_path, "the label file")
        raise ValueError(
            f"Label not saved: {reason.replace(image_path, 'its image') if image_path else reason}"
        ) from None


def _unreadable(path: str) -> str | None:
    """Why the datastore JSON at ``path`` cannot be loaded, or None when it can."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError):
        return "unreadable"
    if not text.strip():
        return "empty"
    try:
        LocalDatastoreModel.model_validate_json(text)
    except ValueError:
        return "corrupt"
    return None


class SafeSessions(Sessions):
    """MONAI Label's sessions, refusing archives that would unpack outside their folder and ids that are paths."""

    def add_session(
        self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: str | None = None
    ) -> tuple[str, Any]:
        if uncompress and not os.path.isdir(data_file):
            check_archive(data_file)
        return super().add_session(data_file, expiry, uncompress, session_id)

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True) -> Any:
        try:
            check_name(session_id, "session id")
        except UnsafePath:
            return None  # MONAI Label answers 404
        return super().get_session(session_id, update_ts, fetch_cache)

    def remove_session(self, session_id: str) -> None:
        super().remove_session(check_name(session_id, "session id"))


def open_datastore(studies: str, protected: Sequence[str], max_voxels: int | None = None) -> SafeLocalDatastore:
    """The studies folder as a datastore, with MONAI Label's datastore settings."""
    return SafeLocalDatastore(
        studies,
        protected,
        max_voxels=max_voxels,
        extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
        auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
    )


def open_sessions() -> SafeSessions:
    return SafeSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)


def readable_image(image: str, datastore: Datastore, sessions: Sessions | None) -> bool:
    """Whether an infer request may read ``image``: a datastore image, a session's image or the file uploaded with
    the request (and, for a header, its data in the studies or session folder). Paths elsewhere and paths that do
    not exist get the same answer, so a client learns nothing about the server's files."""
    if not image:
        return False
    path = os.path.realpath(image)
    roots = [datastore._datastore_path] if isinstance(datastore, LocalDatastore) else []
    roots += [sessions.store_path] if sessions is not None else []
    allowed = any(inside(path, root) for root in roots) or _uploaded(path)
    allowed = allowed or (isinstance(datastore, SafeLocalDatastore) and datastore.owns_image(path))
    if not allowed or not os.path.exists(path):
        return False
    try:
        check_header(path, os.path.dirname(path), roots)
    except UnsafePath as error:
        logger.warning("Not reading %s: %s", path, error.msg)
        return False
    return True


def _uploaded(path: str) -> bool:
    """A file MONAI Label's infer endpoint saved from the request's upload (tempfile's names, in its folder)."""
    folder, name = os.path.split(path)
    in_temp = folder == os.path.realpath(tempfile.gettempdir())
    return in_temp and bool(_UPLOAD_NAME.fullmatch(name)) and os.path.isfile(path)
