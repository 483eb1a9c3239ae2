"""The bundle as MLOps run it: `python -m monai.bundle run` with the real configs and small overrides."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, bundle_run

from scripts.metrics import dice
from scripts.phantom import write_phantom
from scripts.vocabulary import load_vocabulary

TINY = ["--model_size", "tiny", "--ckpt_path", "random", "--score_threshold", "0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundle_data")
    (root / "references").mkdir()
    for seed, code in enumerate(("RAS", "LPS")):
        _, label = write_phantom(root / "images", f"case{seed}", orientation=code, shape=(32, 32, 8), seed=seed)
        # The dataset numbers its labels its own way (liver 2, spleen 7): evaluation must map them by name.
        reference = nib.load(label)
        values = np.asarray(reference.dataobj)
        renumbered = np.select([values == 1, values == 2], [2, 7], 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(renumbered, reference.affine), root / "references" / f"case{seed}.nii.gz")
    items = [{"image": f"images/case{i}.nii.gz", "label": f"references/case{i}.nii.gz"} for i in range(2)]
    (root / "datalist.json").write_text(json.dumps({"testing": items, "labels": {"2": "liver", "7": "spleen"}}))
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
    """Evaluation scores exactly what inference writes, with the dataset's own label numbering."""
    result = bundle_run(
        "--image",
        str(data / "images"),
        "--prompts",
        "['liver', 'spleen']",
        "--output_dir",
        str(tmp_path / "batch"),
        *TINY,
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
    with (tmp_path / "metrics" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(Path(r["image"]).name, r["name"]) for r in rows] == [
        ("case0.nii.gz", "liver"),
        ("case0.nii.gz", "spleen"),
        ("case1.nii.gz", "liver"),
        ("case1.nii.gz", "spleen"),
    ]
    for row in rows:
        case = Path(row["image"]).name
        predicted = np.asarray(nib.load(tmp_path / "batch" / case).dataobj)  # vocabulary values: liver 1, spleen 2
        reference = np.asarray(nib.load(data / "references" / case).dataobj)  # dataset values: liver 2, spleen 7
        vocabulary_value, dataset_value = {"liver": (1, 2), "spleen": (2, 7)}[row["name"]]
        expected = dice(predicted == vocabulary_value, reference == dataset_value)
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-6), row
    summary = json.loads((tmp_path / "metrics" / "summary.json").read_text())
    assert set(summary) == {"liver", "spleen"} and summary["liver"]["cases"] == 2
    assert summary["liver"]["dice_mean"] == pytest.approx(np.mean([float(r["dice"]) for r in rows[::2]]), abs=1e-6)
    with (tmp_path / "metrics" / "interactive.csv").open() as handle:
        interactive = list(csv.DictReader(handle))
    assert list(interactive[0]) == ["image", "label", "name", "clicks", "dice", "repeated_click"]
    assert len(interactive) == 2 * 2 * 3  # cases x labels x (1, 3, 5)
    assert {int(r["label"]) for r in interactive} == {2, 7}  # the dataset's values
    assert (tmp_path / "metrics" / "interactive_dice.png").stat().st_size > 1000
    assert {"dice_1_clicks", "dice_3_clicks", "dice_5_clicks"} <= set(summary["liver"])


def test_a_folder_run_finds_every_image_read_image_reads(tmp_path: Path) -> None:
    """MetaImage files and DICOM series whose files have no extension (as exports often name them) were skipped by
    a folder run, though ``read_image`` reads both."""
    import itk

    from scripts.image_io import read_image
    from scripts.runner import collect_images

    images = tmp_path / "images"
    nifti, _ = write_phantom(tmp_path / "scratch", "nifti", shape=(16, 16, 4))
    series, _ = write_phantom(tmp_path / "scratch", "series", fmt="dicom", shape=(16, 16, 4))
    images.mkdir()
    nifti.rename(images / nifti.name)
    (images / "series").mkdir()
    for number, file in enumerate(sorted(series.iterdir())):
        file.rename(images / "series" / f"IM{number:04d}")
    itk.imwrite(itk.image_from_array(np.zeros((4, 16, 16), np.int16)), str(images / "meta.mha"))
    (images / "notes.txt").write_text("not an image")
    found = [Path(item["image"]).name for item in collect_images(str(images))]
    assert found == ["meta.mha", "nifti.nii.gz", "series"]
    assert collect_images(str(images / "series")) == [{"image": str(images / "series")}]
    assert all(read_image(Path(item["image"])).array.size for item in collect_images(str(images)))


def test_evaluation_scores_items_with_their_own_label_values_by_name(tmp_path: Path, caplog) -> None:
    """An item may number its structures its own way (its ``labels`` map, two values sharing a name): evaluation
    compared every item with the dataset's values, scoring such an item against the wrong voxels."""
    from scripts.evaluation import _in_dataset_values
    from scripts.label_numbering import dataset_labels

    reference = np.array([[0, 3, 4, 9, 1]])
    item = {"label": "case.nii.gz", "labels": {"3": "liver", "4": "liver", "9": "tumour"}}
    scored, converted = _in_dataset_values(item, {1: "liver", 2: "spleen"}, reference)
    assert scored == {1: "liver"} and converted.tolist() == [[0, 1, 1, 0, 0]]  # the spleen: not annotated here
    assert "labels ['tumour'], which the evaluation does not ask for" in caplog.text
    plain, same = _in_dataset_values({"label": "b.nii.gz"}, {1: "liver", 2: "spleen"}, reference)
    assert plain == {1: "liver", 2: "spleen"} and same.tolist() == [[0, 0, 0, 0, 1]]
    datalist = tmp_path / "testing_only.json"
    datalist.write_text(json.dumps({"testing": [{"image": "a.nii.gz", "label": "a_label.nii.gz", **item}]}))
    assert dataset_labels(None, datalist) == {1: "liver", 2: "tumour"}  # testing items' own maps name the labels


BAD_REQUESTS = [
    (["--prompts", "[]"], "No prompts given"),
    (["--prompts", "[{'a': 1}]"], "Text prompts must be strings"),
    (["--prompts", "['liver']", "--points", "[[99, 0, 0]]"], r"Point \[99, 0, 0\] is outside the image"),
    (["--prompts", "['liver']", "--ckpt_path", "/nowhere/model.pt"], "Model weights not found at '/nowhere/model.pt'"),
    (["--prompts", "['liver']", "--model_size", "huge"], "Unknown model_size 'huge'"),
]
# Runs the command line's own entry (fire over monai.bundle's ``run``) on each request in one process, so the suite
# pays MONAI's start-up once; on stderr each request's output lies between "=== request i" and "=== failed" (or
# "=== succeeded").
_RUN_EACH = """
import sys, traceback, fire
from monai.bundle.scripts import run
for i, argv in enumerate(eval(sys.argv[1])):
    print(f"=== request {i}", file=sys.stderr)
    try:
        fire.Fire({"run": run}, command=["run", *argv])
        outcome = "succeeded"
    except BaseException:
        traceback.print_exc()
        outcome = "failed"
    print(f"=== {outcome}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def bad_request_errors(data: Path, tmp_path_factory) -> list[str]:
    """stderr of each of :data:`BAD_REQUESTS` run through the command line's entry."""
    base = ["--config_file", str(REPO / "bundle" / "configs" / "inference.json"), "--image"]
    base += [str(data / "images" / "case0.nii.gz"), "--output_dir", str(tmp_path_factory.mktemp("bad")), *TINY]
    requests = [[*base, *args] for args, _ in BAD_REQUESTS]  # later flags override the defaults
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    command = [sys.executable, "-c", _RUN_EACH, repr(requests)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return re.split(r"=== request \d+\n", done.stderr)[1:]


@pytest.mark.parametrize(("index", "message"), [(i, message) for i, (_, message) in enumerate(BAD_REQUESTS)])
def test_bad_requests_fail_with_a_message(bad_request_errors: list[str], index: int, message: str) -> None:
    assert len(bad_request_errors) == len(BAD_REQUESTS), bad_request_errors
    error = bad_request_errors[index]
    assert "=== failed" in error and "=== succeeded" not in error and re.search(message, error), error[-2000:]


def test_a_bad_request_exits_non_zero_with_its_message(data: Path, tmp_path: Path) -> None:
    """The command line itself, once: a failed request is a non-zero exit with the message on stderr."""
    args, message = BAD_REQUESTS[0]
    result = bundle_run("--image", str(data / "images" / "case0.nii.gz"), "--output_dir", str(tmp_path), *TINY, *args)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-2000:]


def test_each_checkout_sharing_the_environment_imports_its_own_bundle(tmp_path: Path) -> None:
    """setup.sh shares one environment per requirements hash between checkouts: a second checkout's
    ``.venv/bin/python`` must import that checkout's ``scripts``, not those of whichever checkout ran set-up last."""
    environment = Path(sys.prefix).resolve()
    other = tmp_path / "other_checkout"
    (other / "bundle" / "scripts").mkdir(parents=True)
    (other / "bundle" / "scripts" / "__init__.py").write_text("")
    (other / ".venv").symlink_to(environment)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def imported_from(python: Path) -> Path:
        command = [python, "-c", "import scripts; print(scripts.__file__)"]
        found = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
        assert found.returncode == 0, found.stderr
        return Path(found.stdout.strip()).parent

    assert imported_from(other / ".venv" / "bin" / "python") == other / "bundle" / "scripts"
    assert imported_from(Path(sys.prefix) / "bin" / "python") == REPO / "bundle" / "scripts"
