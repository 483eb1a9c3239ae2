"""The bundle as MLOps run it: `python -m monai.bundle run` with the real configs and small overrides."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.phantom import PHANTOM_LABELS, write_phantom
from scripts.vocabulary import load_vocabulary

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TINY = ["--model_size", "tiny", "--ckpt_path", "random", "--score_threshold", "0.0"]


def bundle_run(*args: str, config: str | list[str] = "inference.json") -> subprocess.CompletedProcess:
    configs = [config] if isinstance(config, str) else config
    files = str([str(CONFIGS / c) for c in configs]) if len(configs) > 1 else str(CONFIGS / configs[0])
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle_data")
    for seed, code in enumerate(("RAS", "LPS")):
        write_phantom(root / "images", f"case{seed}", orientation=code, shape=(32, 32, 8), seed=seed)
    items = [{"image": f"images/case{i}.nii.gz", "label": f"images/case{i}_label.nii.gz"} for i in range(2)]
    (root / "datalist.json").write_text(json.dumps({"testing": items, "labels": {"1": "liver", "2": "spleen"}}))
    return root


def test_single_image_with_text_prompts(data: Path, tmp_path: Path) -> None:
    image = data / "images" / "case1.nii.gz"
    result = bundle_run(
        "--image",
        str(image),
        "--prompts",
        "['liver', 'left kidney', 'odd thing']",
        "--output_dir",
        str(tmp_path),
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written, original = nib.load(tmp_path / "case1.nii.gz"), nib.load(image)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    summary = json.loads((tmp_path / "case1.json").read_text())
    assert [row["name"] for row in summary["labels"]] == ["liver", "left kidney", "odd thing"]
    free_index = max(load_vocabulary().by_index) + 1  # free text is numbered after the vocabulary
    assert [row["index"] for row in summary["labels"]] == [1, 4, free_index]
    assert summary["unknown_prompts"] == ["odd thing"]
    assert {"image_encoder", "heads", "assemble_3d"} <= set(summary["timings"])


def test_clicks_and_nrrd_output(data: Path, tmp_path: Path) -> None:
    image = data / "images" / "case0.nii.gz"
    result = bundle_run(
        "--image",
        str(image),
        "--points",
        "[[10, 12, 4]]",
        "--point_labels",
        "[1]",
        "--prompts",
        "['spleen']",
        "--output_ext",
        ".nrrd",
        "--output_dir",
        str(tmp_path),
        *TINY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "case0.json").read_text())
    assert summary["labels"][0]["source"] == "clicks" and summary["output"].endswith("case0.nrrd")
    assert (tmp_path / "case0.nrrd").is_file()


def test_batch_folder_and_evaluation(data: Path, tmp_path: Path) -> None:
    result = bundle_run(
        "--image", str(data / "images"), "--prompts", "['liver']", "--output_dir", str(tmp_path / "batch"), *TINY
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = sorted(p.name for p in (tmp_path / "batch").glob("*.nii.gz"))
    # every image in the folder is segmented, labels included as images of their own
    assert outputs == ["case0.nii.gz", "case0_label.nii.gz", "case1.nii.gz", "case1_label.nii.gz"]
    result = bundle_run(
        "--datalist",
        str(data / "datalist.json"),
        "--output_dir",
        str(tmp_path / "metrics"),
        *TINY,
        config=["inference.json", "evaluate.json"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    csv_rows = (tmp_path / "metrics" / "metrics.csv").read_text().strip().splitlines()
    assert csv_rows[0] == "image,label,name,dice,nsd" and len(csv_rows) == 1 + 2 * 2
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert set(summary) == {"liver", "spleen"} and summary["liver"]["cases"] == 2
    assert 0.0 <= summary["liver"]["dice_mean"] <= 1.0
    interactive = (tmp_path / "metrics" / "interactive.csv").read_text().strip().splitlines()
    assert (
        interactive[0] == "image,label,name,clicks,dice" and len(interactive) == 1 + 2 * 2 * 3
    )  # cases x labels x (1,3,5)
    assert (tmp_path / "metrics" / "interactive_dice.png").stat().st_size > 1000
    assert {"dice_1_clicks", "dice_3_clicks", "dice_5_clicks"} <= set(summary["liver"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "[]"], "No prompts given"),
        (["--prompts", "[{'a': 1}]"], "Text prompts must be strings"),
        (["--prompts", "['liver']", "--points", "[[99, 0, 0]]"], r"Point \[99, 0, 0\] is outside the image"),
        (
            ["--prompts", "['liver']", "--ckpt_path", "/nowhere/model.pt"],
            "Model weights not found at '/nowhere/model.pt'",
        ),
        (["--prompts", "['liver']", "--model_size", "huge"], "Unknown model_size 'huge'"),
    ],
)
def test_bad_requests_fail_with_a_message(data: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["--image", str(data / "images" / "case0.nii.gz"), "--output_dir", str(tmp_path), *TINY]
    result = bundle_run(*base, *args)  # later flags override the defaults above
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-2000:]


def test_metadata_matches_vocabulary() -> None:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in (
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "task",
        "network_data_format",
    ):
        assert key in meta
    assert meta["version"] in meta["changelog"]
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channel_def == load_vocabulary().channel_def()
    assert all(channel_def[str(k)] == v for k, v in PHANTOM_LABELS.items())
