"""The app's reading of client requests, without a server: options, label numbering, clicks, ROI."""

from __future__ import annotations

import json
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import REPO

from scripts.image_io import read_image
from scripts.phantom import write_phantom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "monailabel_app"))

from lib import model_service  # noqa: E402
from lib.auto_labels import AutoLabels  # noqa: E402
from lib.dicom_source import dicom_tags  # noqa: E402
from lib.infers.auto_segmentation import AutoSegmentation  # noqa: E402
from lib.infers.interactive import InteractiveSegmentation, roi_mask  # noqa: E402
from lib.infers.vista3d_prompts import Vista3dPrompts  # noqa: E402
from lib.model_service import ModelService, results_folder, write_result  # noqa: E402
from lib.published_weights import PublishedWeights  # noqa: E402
from lib.settings import AppSettings  # noqa: E402


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> ModelService:
    settings = AppSettings.from_conf({"model_size": "tiny", "checkpoint": "random", "device": "cpu"})
    return ModelService(settings, PublishedWeights(tmp_path_factory.mktemp("model")))


def test_settings_are_typed_and_checked(tmp_path) -> None:
    """App options are the app's own; every other key overrides an inference.json id, typed like its default."""
    settings = AppSettings.from_conf({"batch_size": "4", "score_threshold": "0.3", "labels": "liver,spleen"})
    assert settings.overrides == {"batch_size": 4, "score_threshold": 0.3} and settings.labels == "liver,spleen"
    assert AppSettings.from_conf({"checkpoint": "/x.pt", "device": "cpu"}).overrides == {
        "ckpt_path": "/x.pt",
        "device_name": "cpu",
    }
    with pytest.raises(ValueError, match="--conf batch_size expects a int, got 'many'"):
        AppSettings.from_conf({"batch_size": "many"})
    with pytest.raises(ValueError, match="--conf score_threshold expects a float, got 'inf'"):
        AppSettings.from_conf({"score_threshold": "inf"})
    with pytest.raises(ValueError, match=r"Unknown --conf options \['modelsize'\]"):
        AppSettings.from_conf({"modelsize": "tiny"})
    with pytest.raises(ValueError, match=r"Unknown --conf options \['image'\]"):
        AppSettings.from_conf({"image": "/etc/passwd"})  # a request's field, not a serving option
    with pytest.raises(ValueError, match="--conf model_size must be one of \\['base', 'small', 'tiny'\\], got 'huge'"):
        ModelService(AppSettings.from_conf({"model_size": "huge"}), PublishedWeights(tmp_path))
    missing = ModelService(AppSettings.from_conf({"checkpoint": "/x.pt"}), PublishedWeights(tmp_path))
    assert "weights not found at /x.pt" in missing.status


def test_bundle_configs_apply_over_inference_json(tmp_path) -> None:
    """``--conf configs demo.json`` serves what ``--config_file "['inference.json','demo.json']"`` runs (the demo
    model, its threshold and click refinement); single ``--conf`` ids still win; only the bundle's own configs."""
    demo = AppSettings.from_conf({"configs": "demo.json", "score_threshold": "0.3"})
    assert demo.overrides["score_threshold"] == 0.3 and demo.overrides["click_refinement"] == "instances"
    service = ModelService(AppSettings.from_conf({"configs": "demo.json"}), PublishedWeights(tmp_path))
    assert service.ready and Path(service.base_checkpoint).name == "demo_tiny.pt"
    threshold = json.loads((REPO / "bundle" / "configs" / "demo.json").read_text())["score_threshold"]
    assert service._segmenter.predictor.score_threshold == threshold  # click_refinement tells it from inference.json's
    assert service._segmenter.click_refinement == "instances"
    for name, message in (
        ("../configs/demo.json", "file names in the bundle's configs folder"),
        ("/etc/passwd", "file names in the bundle's configs folder"),
        ("missing.json", "cannot read"),
        ("train.json", "are not inference.json ids the app may set"),
        ("vocabulary.json", "are not inference.json ids the app may set"),
    ):
        with pytest.raises(ValueError, match=f"--conf configs .*{message}"):
            AppSettings.from_conf({"configs": name})


def test_offered_labels_are_numbered_from_one(service) -> None:
    assert service.offered_labels(["spleen", "Liver", "liver"]) == {"spleen": 1, "liver": 2}
    assert list(service.offered_labels().values()) == list(range(1, len(service.vocabulary) + 1))
    with pytest.raises(ValueError, match=r"not in the vocabulary: \['wombat'\]"):
        service.offered_labels(["wombat"])


def test_auto_prompts(service, tmp_path) -> None:
    task = AutoSegmentation(service, service.offered_labels(["spleen", "aorta", "liver", "brain"]))
    ct, _ = write_phantom(tmp_path, "ct", shape=(16, 16, 4))
    mr, _ = write_phantom(tmp_path, "mr", kind="mr", shape=(16, 16, 4))
    # nothing named, or OHIF's empty label_prompt: the modality's default set among the offered labels, in its order
    assert task.prompts({"image": str(ct), "labels": "", "text": ""}).texts == ("liver", "spleen", "aorta")
    assert task.prompts({"image": str(ct), "label_prompt": []}).texts == ("liver", "spleen", "aorta")
    assert task.prompts({"image": str(mr)}).texts == ("liver", "spleen", "aorta")
    assert task.prompts({"label_prompt": [3], "text": "odd blob"}).texts == ("liver", "odd blob")
    with pytest.raises(ValueError, match=r"Label index 5 is not one of this model's labels \(1..4\)"):
        task.prompts({"label_prompt": [5]})


def test_auto_label_sets(tmp_path) -> None:
    auto = AutoLabels.load()
    offered = ["liver", "spleen", "brain", "white matter", "left lung", "heart"]
    assert auto.choose(offered, "CT") == ["liver", "spleen"]
    assert auto.choose(offered, "CT", "chest") == ["left lung", "heart"]
    assert auto.choose(offered, "MR", "HEAD") == ["brain", "white matter"]
    assert auto.choose(offered, "US") == ["liver", "spleen"]  # no set for the modality: the fallback
    assert auto.choose(["heart"], "MR", "HEAD") == ["heart"]  # none of the set offered: what is offered
    assert auto.choose(offered, "CT", all_offered=True) == offered  # the site chose them with --conf labels
    folder, _ = write_phantom(tmp_path, "dicom", fmt="dicom", shape=(8, 8, 3))
    assert dicom_tags(str(folder)) == ("CT", "ABDOMEN")  # as the phantom writes it
    for path in sorted(folder.iterdir()):
        header = pydicom.dcmread(str(path))
        header.BodyPartExamined = "CHEST"
        header.save_as(str(path))
    assert dicom_tags(str(folder)) == ("CT", "CHEST") and dicom_tags("") == ("", "")
    bad = tmp_path / "auto_labels.json"
    bad.write_text('{"modalities": {"CT": {"CHEST": ["heart"]}}, "fallback": ["liver"]}')
    with pytest.raises(ValueError, match="every modality needs a 'default' set"):
        AutoLabels.load(bad)


def test_click_prompts(service) -> None:
    task = InteractiveSegmentation(service, service.offered_labels())
    named = task.prompts({"label": "liver", "foreground": [[1, 2, 3]], "background": [[4, 5, 6]], "text": ""})
    assert named.texts == ("liver",) and named.point_labels.tolist() == [1, 0]
    generic = task.prompts({"label": "Segment_1", "foreground": [[1, 2, 3]], "background": []})
    assert generic.texts == ()  # a generic segment name is not a prompt
    assert task.prompts({"label": "Segment_1", "foreground": [[1, 2, 3]], "text": "hepatic lesion"}).texts == (
        "hepatic lesion",
    )
    assert task.prompts({"label": "spleen", "foreground": [], "background": []}).texts == ("spleen",)
    with pytest.raises(ValueError, match="No clicks"):
        task.prompts({"label": "Segment_1", "foreground": [], "background": []})
    with pytest.raises(ValueError, match="2 text prompts were given: give at most one"):
        task.prompts({"label": "Segment_1", "foreground": [[1, 2, 3]], "text": "lesion; cyst"})
    with pytest.raises(ValueError, match=r"roi must have 6 numbers .*got \[1.0, 2.0, 3.0\]"):  # before the model
        task.prompts({"label": "liver", "foreground": [[1, 2, 3]], "roi": [1, 2, 3]})


def test_vista3d_prompts(service, tmp_path) -> None:
    task = Vista3dPrompts(service, service.offered_labels(["liver", "aorta"]))
    prompt = task.prompts({"label_prompt": [2], "points": [[1, 2, 3], [3, 3, 3]], "point_labels": [1, 0]})
    assert prompt.texts == ("aorta",) and prompt.points.shape == (2, 3)
    ct, _ = write_phantom(tmp_path, "ct", shape=(16, 16, 4))
    assert task.prompts({"image": str(ct)}).texts == ("liver", "aorta")  # OHIF's Auto: the CT set
    assert task.prompts({"image": str(ct), "label_prompt": []}).texts == ("liver", "aorta")  # the Class tab's default


def test_seg_results_need_a_dicom_series(tmp_path) -> None:
    image, label = write_phantom(tmp_path, "ct", shape=(16, 16, 4))
    volume = read_image(image)
    with pytest.raises(ValueError, match="needs an image from a DICOM series"):
        write_result(read_image(label).array, volume, ".dcm", None, True)
    folder, label = write_phantom(tmp_path, "series", fmt="dicom", shape=(16, 16, 4))
    with pytest.raises(ValueError, match="Nothing was segmented"):
        write_result(np.zeros(volume.shape, np.uint8), read_image(folder), ".dcm", None, True, (folder, []))
    assert not list((Path(tempfile.gettempdir()) / "medsam3_results").glob("*.dcm"))  # no leftovers


def test_results_wait_in_a_folder_no_other_account_can_write(tmp_path, monkeypatch) -> None:
    """``medsam3_results`` in the temp folder when this account owns it and no one else may write there; a folder
    another account made (it would refuse our files, or swap them before they are sent) gives a private one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model_service._private_results_folder.cache_clear()
    shared = tmp_path / "medsam3_results"
    assert results_folder() == shared and stat.S_IMODE(shared.stat().st_mode) == 0o700
    shared.chmod(0o777)
    private = results_folder()
    assert private.parent == tmp_path and private != shared and stat.S_IMODE(private.stat().st_mode) == 0o700
    shared.rmdir()
    (tmp_path / "elsewhere").mkdir()
    shared.symlink_to(tmp_path / "elsewhere")
    assert results_folder() == private
    volume = read_image(write_phantom(tmp_path, "ct", shape=(4, 4, 2))[0])
    path = write_result(np.zeros((4, 4, 2), np.uint8), volume, ".nii.gz", None, True)
    assert Path(path).parent == private and not list((tmp_path / "elsewhere").iterdir())
    model_service._private_results_folder.cache_clear()


def test_uncertainty_scoring_keeps_to_the_voxel_limit(tmp_path, caplog) -> None:
    """Scoring read every unlabelled image whatever its size; one over ``max_voxels`` is skipped, as uploads are."""
    from types import SimpleNamespace

    from lib.activelearning.uncertainty import UncertaintyScoring

    settings = AppSettings.from_conf(
        {"model_size": "tiny", "checkpoint": "random", "device": "cpu", "max_voxels": "1000"}
    )
    service = ModelService(settings, PublishedWeights(tmp_path / "model"))
    image, _ = write_phantom(tmp_path, "big", shape=(16, 16, 8))  # 2,048 voxels
    scored: dict = {}
    datastore = SimpleNamespace(
        get_unlabeled_images=lambda: ["big"],
        get_image_uri=lambda image_id: str(image),
        update_image_info=lambda image_id, info: scored.update({image_id: info}),
    )
    assert UncertaintyScoring(service, ["liver"])({}, datastore) == {} and not scored
    assert "skipped big: big.nii.gz claims 2,048 voxels" in caplog.text


def test_roi_mask() -> None:
    mask = roi_mask([5, 2, 0, 3, 9, 7], (10, 10, 10))  # pairs in either order, as Slicer sends them
    assert mask.sum() == 4 * 4 * 3 and mask[2:6, 0:4, 7:10].all()
    assert roi_mask([-5, 100, 0, 9, 0, 9], (10, 10, 10)).all()  # clipped to the image
    with pytest.raises(ValueError, match="roi must have 6 numbers"):
        roi_mask([1, 2], (10, 10, 10))
    with pytest.raises(ValueError, match="lies outside the image"):
        roi_mask([20, 30, 0, 1, 0, 1], (10, 10, 10))
    assert np.issubdtype(mask.dtype, np.integer)


def test_images_are_read_once_per_version(service, tmp_path) -> None:
    import os

    image, _ = write_phantom(tmp_path, "ct", shape=(16, 16, 4))
    first = service._read(str(image))
    assert service._read(str(image)) is first  # a second click does not re-read the file
    os.utime(image, ns=(1, 10**18))
    assert service._read(str(image)) is not first  # an edited file is read again


def test_the_app_serves_another_bundle_folder(tmp_path) -> None:
    """``--conf bundle <dir>``: a site's copy of the bundle, with its own configs and vocabulary, is what is served."""
    import json
    import shutil

    from lib.bundle_path import BUNDLE_ROOT
    from lib.trainers.fine_tuning import FineTuning

    copy = tmp_path / "site_bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", copy / "configs")
    inference = json.loads((copy / "configs" / "inference.json").read_text())
    inference["score_threshold"] = 0.25
    (copy / "configs" / "inference.json").write_text(json.dumps(inference))
    vocabulary = json.loads((copy / "configs" / "vocabulary.json").read_text())
    vocabulary["labels"] = vocabulary["labels"][:3]  # a site offering three structures
    (copy / "configs" / "vocabulary.json").write_text(json.dumps(vocabulary))
    settings = AppSettings.from_conf({"bundle": str(copy), "model_size": "tiny", "checkpoint": "random"})
    service = ModelService(settings, PublishedWeights(tmp_path / "model"))
    assert service.offered_labels() == {"liver": 1, "spleen": 2, "right kidney": 3}
    assert service.ready and service._segmenter.predictor.score_threshold == 0.25
    trainer = FineTuning(settings, service.offered_labels(), tmp_path / "model")
    assert trainer.config_files[0] == str(copy / "configs" / "train.json") and trainer.defaults["model_size"] == "tiny"
    with pytest.raises(ValueError, match="--conf bundle .*: cannot read"):
        AppSettings.from_conf({"bundle": str(tmp_path / "nowhere")})
