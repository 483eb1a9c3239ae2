"""Checks and writes that keep the datastore inside the studies folder and whole after a crash.

Names that come from clients (image ids, label tags, session archive members) are checked before any path is built
from them. A file is written to a temporary name in its destination folder, flushed to disk and renamed over the
destination, so a reader, or a server restarted after ``kill -9``, sees the old file or the new one, never a part.
Refusals are :class:`UnsafePath` (HTTP 400); their messages never name a server path.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)

MAX_NAME_BYTES = 255  # a file name's limit on common file systems
TEMP_PREFIX = ".medsam3-tmp-"  # + "<writer pid>-<random>"; cleaned at start-up once that writer is gone
HEADER_SUFFIXES = (".nhdr", ".nrrd", ".mhd", ".mha")  # formats whose header may name a separate data file
HEADER_BYTES = 1 << 20  # headers are text at the start of the file; data files are not named beyond this
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-[0-9a-f]+")
_NUMBER_FORMAT = re.compile(r"%[-+ #0-9.]*[diouxX]")  # a numbered file pattern: "slice%03d.raw 1 40 1"
_PATTERN_TAIL = re.compile(r"\s+-?\d+\s+-?\d+\s+-?\d+(\s+\d+)?\s*$")


class UnsafePath(MONAILabelException):
    """A client's name or file that would reach outside its folder: the client's to fix (HTTP 400)."""

    def __init__(self, msg: str) -> None:
        super().__init__(MONAILabelError.INVALID_INPUT, msg)


def _has_control(value: str) -> bool:
    return any(ord(char) < 32 or ord(char) == 127 for char in value)


def check_name(value: object, what: str) -> str:
    """``value`` if it is usable as one file or folder name (an image id, a label tag), else :class:`UnsafePath`."""
    if not isinstance(value, str) or not value:
        raise UnsafePath(f"{what} must be a non-empty string")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise UnsafePath(f"{what} is not valid UTF-8") from error
    if size > MAX_NAME_BYTES:
        raise UnsafePath(f"{what} is longer than {MAX_NAME_BYTES} bytes")
    if _has_control(value):
        raise UnsafePath(f"{what} must not contain control characters")
    if "/" in value or "\\" in value:
        raise UnsafePath(f"{what} must not contain path separators")
    if value in (".", "..") or value.startswith(TEMP_PREFIX):
        raise UnsafePath(f"{what} {value!r} is reserved")
    return value


def check_member(name: str, what: str) -> None:
    """An archive member's name or link target: relative, without ``..``, without control characters."""
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or ".." in path.parts or _has_control(name):
        raise UnsafePath(f"The archive has a {what} that is empty, absolute or has '..'; such archives are refused")


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with links resolved, is ``root`` or below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (the entry, not just the file's data)."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(dest: str | Path, write: Callable[[BinaryIO], object], mode: int = 0o666) -> None:
    """Write ``dest`` through ``write(handle)`` so that it is either its old content or all of the new one; a new
    file gets ``mode`` (less the umask) from its first byte."""
    folder = os.path.dirname(os.path.abspath(dest))
    temp = os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, dest)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(folder)


def atomic_copy(source: str | Path, dest: str | Path) -> None:
    with open(source, "rb") as data:
        atomic_write(dest, lambda handle: shutil.copyfileobj(data, handle, 1 << 20))


def atomic_write_text(dest: str | Path, text: str) -> None:
    atomic_write(dest, lambda handle: handle.write(text.encode("utf-8")))


def remove_stale_temp_files(folders: Iterable[str | Path]) -> list[str]:
    """Delete the temporary files and folders of writers that were killed; a live writer's (another server process
    on the same studies, such as MONAI Label's training subprocess) are left alone."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if not match or _alive(int(match.group(1))):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):  # a half-downloaded PACS series (lib/dicomweb.py)
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def header_data_files(path: str | Path) -> list[str]:
    """The data files a NRRD (``data file:``) or MetaImage (``ElementDataFile``) header names; empty when its data
    is in the file itself. A numbered pattern is given as one of its files, a ``LIST`` as all of them."""
    with open(path, "rb") as handle:
        lines = handle.read(HEADER_BYTES).decode("latin-1").splitlines()
    nrrd = str(path).lower().endswith((".nhdr", ".nrrd"))
    for number, line in enumerate(lines):
        if nrrd and not line.strip():
            return []  # the blank line that ends a NRRD header; attached data follows
        key, sep, value = line.partition(":" if nrrd else "=")
        key = key.strip().lower()
        if not sep or key not in (("data file", "datafile") if nrrd else ("elementdatafile",)):
            continue
        value = value.lstrip("=").strip()  # a NRRD "data file:=..." key/value pair is checked too: stricter
        if value.upper() == "LOCAL":
            return []
        if value.split()[:1] == ["LIST"]:
            return [name.strip() for name in lines[number + 1 :] if name.strip()]
        names = [value]
        if _PATTERN_TAIL.search(value):
            names.append(_PATTERN_TAIL.sub("", value))
        return [_NUMBER_FORMAT.sub("0", name) for name in names]
    return []


def check_header(path: str | Path, folder: str | Path, roots: Sequence[str | Path]) -> list[str]:
    """Refuse a header whose data files, read relative to ``folder`` (where the header is or will be), fall
    outside every one of ``roots``; return those files (none for a file that holds its own data)."""
    if not str(path).lower().endswith(HEADER_SUFFIXES):
        return []
    try:
        names = header_data_files(path)
    except OSError as error:
        raise UnsafePath("The image header could not be read") from error
    for name in names:
        if _has_control(name) or not any(inside(os.path.join(folder, name), root) for root in roots):
            raise UnsafePath("The image header names a data file outside the studies folder; such files are refused")
    return names


def check_archive(path: str | Path) -> None:
    """Refuse a session archive (tar or zip) with absolute or ``..`` members, links that could leave the folder it
    is unpacked into, or device files."""
    try:
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as archive:
                for member in archive:
                    check_member(member.name, "member")
                    if member.issym() or member.islnk():
                        check_member(member.linkname, "link")
                    elif not (member.isfile() or member.isdir()):
                        raise UnsafePath("The archive has a device or other special file; such archives are refused")
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    check_member(name, "member")
        else:
            raise UnsafePath("The session upload is not a tar or zip archive (uncompress=true needs one)")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise UnsafePath(f"The archive could not be read: {type(error).__name__}") from error
