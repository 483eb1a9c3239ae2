"""The fine-tuned weights the trainer publishes and the serving model loads: one file per kind, replaced atomically.

Adapter runs (``lora``, ``adapter3d``) publish small files that load on top of the base checkpoint; ``full`` runs
publish a whole checkpoint that replaces it. Only the newest kind is kept. A training run that stops before the
end publishes nothing, so the serving model keeps its weights.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_FILE = "medsam3_finetuned_adapter.pt"
FULL_FILE = "medsam3_finetuned_full.pt"


class PublishedWeights:
    """The published files in ``folder`` (the app's model folder)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def adapter(self) -> str | None:
        return self._existing(ADAPTER_FILE)

    def _existing(self, name: str) -> str | None:
        path = self.folder / name
        return str(path) if path.is_file() else None

    def current(self) -> tuple[tuple | None, str | None, str | None]:
        """``(version, adapter file, full checkpoint)`` from one look at the folder: the newest file only.

        The version (name, modification time, size and inode of each file) changes whenever a file is published or
        removed, so a reader that saw a half-done swap sees another version on its next look.
        """
        stamps = []
        for name in (ADAPTER_FILE, FULL_FILE):
            try:
                stat = (self.folder / name).stat()
            except FileNotFoundError:
                continue
            stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino, name))
        if not stamps:
            return None, None, None
        newest = str(self.folder / max(stamps)[-1])
        return tuple(sorted(stamps)), *((newest, None) if newest.endswith(ADAPTER_FILE) else (None, newest))

    def publish(self, source: str | Path, mode: str) -> Path:
        """Copy a training run's weights into place without a moment where a reader sees a partial file, or no file:
        the other kind goes only once the new file (the newest, so the one served) is in place."""
        name, other = (FULL_FILE, ADAPTER_FILE) if mode == "full" else (ADAPTER_FILE, FULL_FILE)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / name
        partial = temp_name(target)
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        (self.folder / other).unlink(missing_ok=True)
        logger.info("Published %s weights: %s", mode, target)
        return target


def temp_name(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place: named after this process, so what a killed writer left
    can be told from what a live one is writing (:func:`lib.trainers.run_guard.remove_temp_files`)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")
