"""A bounded, least-recently-used cache of image encodings, so repeated prompts on an image skip the encoder.

Keys name the image file and its modification time, so an edited file is encoded again; the bound is the
encodings' memory (on the model's device), not their count.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from .predictor import VolumeEncoding

__all__ = ["EncodingCache", "image_key"]

logger = logging.getLogger(__name__)


def image_key(path: str | Path, *extra: Hashable) -> tuple:
    """A key for an image file's encoding: path, size and modification time, plus what shaped the encoding."""
    path = Path(path)
    stat = path.stat() if path.exists() else None
    stamp = (stat.st_size, stat.st_mtime_ns) if stat and path.is_file() else _folder_stamp(path)
    return (str(path.resolve()), stamp, *extra)


def _folder_stamp(path: Path) -> tuple:
    if not path.is_dir():
        return ()
    files = sorted(path.iterdir())
    return (len(files), max((f.stat().st_mtime_ns for f in files), default=0))


class EncodingCache:
    """Thread-safe LRU of :class:`VolumeEncoding` bounded by ``max_bytes``; ``max_bytes=0`` disables it."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, VolumeEncoding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes() for e in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> VolumeEncoding | None:
        with self._lock:
            encoding = self._items.get(key)
            if encoding is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return encoding

    def put(self, key: tuple, encoding: VolumeEncoding) -> None:
        size = encoding.nbytes()
        with self._lock:
            if size > self.max_bytes:
                logger.info(
                    "Encoding of %.1f MB exceeds the cache (%.1f MB): not cached", size / 1e6, self.max_bytes / 1e6
                )
                return
            self._items[key] = encoding
            self._items.move_to_end(key)
            total = sum(e.nbytes() for e in self._items.values())
            while total > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                total -= evicted.nbytes()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
