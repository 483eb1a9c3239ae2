"""The bundle's ``metadata.json`` against the MONAI Bundle specification's rules and against the code it describes.

The model-zoo schema is a download; these are the specification's mandatory keys and tensor-format rules
(``docs/source/mb_specification.rst`` in MONAI), checked offline, plus consistency with the model and vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import monai
import numpy as np
import pytest
import torch

from scripts.model_sizes import MODEL_SIZES
from scripts.vocabulary import load_vocabulary

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
REQUIREMENTS = BUNDLE.parent / "requirements.txt"
MANDATORY = {
    "version": str,
    "changelog": dict,
    "monai_version": str,
    "pytorch_version": str,
    "numpy_version": str,
    "task": str,
    "description": str,
    "authors": str,
    "copyright": str,
    "network_data_format": dict,
}
TENSOR_KEYS = {
    "type": str,
    "format": str,
    "modality": str,
    "num_channels": int,
    "spatial_shape": list,
    "dtype": str,
    "value_range": list,
    "is_patch_data": bool,
    "channel_def": dict,
}
TYPES = {"image", "series", "tuples", "probabilities"}
FORMATS = {"magnitude", "hounsfield", "kspace", "raw", "labels", "classes", "segmentation", "points", "normals"}
FORMATS |= {"indices", "sequence", "latent", "gradient"}
SEMVER = re.compile(r"\d+\.\d+\.\d+")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((BUNDLE / "configs" / "metadata.json").read_text())


def _pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    pins = (line.split("==") for line in lines if "==" in line)
    return {name.split("[")[0].lower(): version for name, version in pins}


def test_mandatory_keys_and_types(meta: dict) -> None:
    for key, kind in MANDATORY.items():
        assert isinstance(meta.get(key), kind) and meta[key], key
    assert SEMVER.fullmatch(meta["version"])
    versions = sorted(meta["changelog"], key=lambda v: tuple(map(int, v.split("."))))
    assert versions[-1] == meta["version"], "the version is the changelog's newest entry"
    assert set(meta["network_data_format"]) == {"inputs", "outputs"}


def test_versions_are_the_pinned_ones(meta: dict) -> None:
    pins = _pins()
    assert meta["monai_version"] == monai.__version__ == pins["monai"]
    assert meta["pytorch_version"] == torch.__version__.split("+")[0] == pins["torch"]
    assert meta["numpy_version"] == np.__version__ == pins["numpy"]
    for package, version in meta["required_packages_version"].items():
        assert pins[package.lower()] == version, package


def test_tensor_formats(meta: dict) -> None:
    for direction in ("inputs", "outputs"):
        for name, tensor in meta["network_data_format"][direction].items():
            where = f"{direction}.{name}"
            for key, kind in TENSOR_KEYS.items():
                assert isinstance(tensor.get(key), kind), f"{where}.{key}"
            assert tensor["type"] in TYPES and tensor["format"] in FORMATS, where
            assert all(isinstance(s, int) and s > 0 or isinstance(s, str) for s in tensor["spatial_shape"]), where
            assert isinstance(getattr(torch, tensor["dtype"], None), torch.dtype), where
            low_high = tensor["value_range"]
            assert low_high == [] or (len(low_high) == 2 and low_high[0] <= low_high[1]), where
            assert all(key.isdigit() for key in tensor["channel_def"]), where


def test_input_is_what_the_model_takes(meta: dict) -> None:
    """Slices resized to the base model's square input, grey repeated to 3 channels, normalised to [-1, 1]."""
    image = meta["network_data_format"]["inputs"]["image"]
    size = MODEL_SIZES["base"].image_size
    assert image["spatial_shape"] == [size, size] and image["value_range"] == [-1, 1]
    assert image["num_channels"] == 3 == len(image["channel_def"])
    assert image["format"] == "magnitude"  # windowed intensities, not Hounsfield units


def test_output_is_the_vocabulary_label_map(meta: dict) -> None:
    pred = meta["network_data_format"]["outputs"]["pred"]
    vocabulary = load_vocabulary(BUNDLE / "configs" / "vocabulary.json")
    assert pred["format"] == "segmentation" and pred["num_channels"] == 1
    assert pred["channel_def"] == vocabulary.channel_def()
    assert pred["value_range"][0] == 0 and pred["value_range"][1] >= max(vocabulary.by_index)
    assert "configs/vocabulary.json" in meta["label_classes"]  # a file inside the bundle


def test_eval_metrics_are_measured_numbers(meta: dict) -> None:
    metrics = meta["eval_metrics"]
    assert isinstance(metrics, dict)
    for name, value in metrics.items():
        assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, name
