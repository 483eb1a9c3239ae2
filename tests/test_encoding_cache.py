"""The encoding cache: least recently used goes first, the bound is bytes, edited files are new keys."""

from __future__ import annotations

import os

import pytest
import torch

from scripts.encoding_cache import EncodingCache, image_key
from scripts.predictor import VolumeEncoding


def _encoding(kib: int) -> VolumeEncoding:
    return VolumeEncoding(trunk=torch.zeros(kib * 256), height=1, width=1)  # kib KiB of float32


def test_lru_eviction_by_bytes() -> None:
    cache = EncodingCache(max_bytes=3 * 1024)
    for name in "abc":
        cache.put((name,), _encoding(1))
    assert cache.get(("a",)) is not None  # a is now the most recent
    cache.put(("d",), _encoding(1))
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and len(cache) == 3
    cache.put(("big",), _encoding(4))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(("big",)) is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (2, 2) and cache.nbytes == 3 * 1024
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        EncodingCache(-1)


def test_disabled_cache_keeps_nothing() -> None:
    cache = EncodingCache(0)
    cache.put(("a",), _encoding(1))
    assert cache.get(("a",)) is None


def test_image_key_changes_when_the_file_changes(tmp_path) -> None:
    path = tmp_path / "image.nii.gz"
    path.write_bytes(b"one")
    first = image_key(path, "axial")
    assert image_key(path, "axial") == first and image_key(path, "coronal") != first
    path.write_bytes(b"other content")
    os.utime(path, ns=(1, 10**18))
    assert image_key(path, "axial") != first
