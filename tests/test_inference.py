"""Images in, label maps out: geometry round trips, every prompt type in 2D and 3D, bad input."""

from __future__ import annotations

import gzip
import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_model
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

from scripts.encoding_cache import EncodingCache
from scripts.image_io import ImageVolume, read_image
from scripts.image_writing import write_label
from scripts.inference import VolumeSegmenter
from scripts.orientation import SliceView
from scripts.phantom import write_phantom
from scripts.predictor import Medsam3Predictor
from scripts.prompts import PromptSet
from scripts.vocabulary import load_vocabulary

SHAPE = (40, 36, 12)
SPACING = (1.2, 1.5, 3.0)


@pytest.fixture(scope="module")
def segmenter() -> VolumeSegmenter:
    predictor = Medsam3Predictor(tiny_model(seed=2), batch_size=6, score_threshold=0.0, max_empty_slices=None)
    return VolumeSegmenter(predictor, load_vocabulary(), click_refinement="tracker")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("phantoms")
    files = {
        code: write_phantom(root, code, orientation=code, shape=SHAPE, spacing=SPACING)
        for code in ("RAS", "LPS", "PSR", "ILA")
    }
    files["nrrd"] = write_phantom(root, "nrrd", fmt="nrrd", orientation="LPS", shape=SHAPE, spacing=SPACING)
    files["dicom"] = write_phantom(root, "dicom", fmt="dicom", shape=SHAPE, spacing=SPACING)
    files["png"] = write_phantom(root, "picture", fmt="png", shape=(64, 80, 1))
    return files


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_orientation(array, ornt_transform(axcodes2ornt(nib.aff2axcodes(affine)), axcodes2ornt("RAS")))


@pytest.mark.parametrize("code", ["LPS", "PSR", "ILA"])
def test_result_is_independent_of_storage_order(segmenter, phantoms, tmp_path, code: str) -> None:
    """The same anatomy stored in another axis order gives the same physical segmentation, in its own grid."""
    prompts = PromptSet.create(texts=["liver", "spleen"])
    reference = segmenter.segment(read_image(phantoms["RAS"][0]), prompts).label
    volume = read_image(phantoms[code][0])
    label = segmenter.segment(volume, prompts).label
    assert label.shape == volume.array.shape
    out = write_label(label, volume, tmp_path / f"{code}.nii.gz")
    written, original = nib.load(out), nib.load(phantoms[code][0])
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-4)
    np.testing.assert_array_equal(_to_ras(np.asarray(written.dataobj), written.affine), reference)
    assert set(np.unique(reference)) <= {0, 1, 2} and (reference > 0).any()


def test_nrrd_and_dicom_series_round_trip(segmenter, phantoms, tmp_path) -> None:
    prompts = PromptSet.create(texts=["liver"])
    reference = segmenter.segment(read_image(phantoms["RAS"][0]), prompts).label
    for key in ("nrrd", "dicom"):
        volume = read_image(phantoms[key][0])
        label = segmenter.segment(volume, prompts).label
        out = write_label(label, volume, tmp_path / f"{key}.nrrd")
        back = read_image(out)
        np.testing.assert_allclose(back.direction, volume.direction, atol=1e-6)
        np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
        np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-5)
        ras = SliceView.for_volume(volume).to_view(label)
        expected = SliceView.for_volume(read_image(phantoms["RAS"][0])).to_view(reference)
        if key == "nrrd":  # same voxels as the NIfTI: identical; DICOM stores rounded HU, so only the grid is checked
            np.testing.assert_array_equal(ras, expected)
        assert ras.shape == expected.shape


def test_click_lands_in_clicked_structure(phantoms) -> None:
    """A click at a liver voxel of a non-RAS file maps to a liver voxel of the model's view."""
    image_path, label_path = phantoms["PSR"]
    volume, label = read_image(image_path), read_image(label_path).array
    liver = np.argwhere(label == 1)
    point = liver[len(liver) // 2]
    view = SliceView.for_volume(volume)
    d, h, w = view.points_to_view(point[None])[0]
    assert view.to_view(label)[d, h, w] == 1
    ras_volume = read_image(phantoms["RAS"][0])
    np.testing.assert_array_equal(
        view.to_view(volume.array), SliceView.for_volume(ras_volume).to_view(ras_volume.array)
    )


def test_clicks_boxes_and_text_on_a_volume(segmenter, phantoms) -> None:
    volume = read_image(phantoms["LPS"][0])
    clicks = segmenter.segment(
        volume, PromptSet.create(texts=["liver"], points=[[12, 20, 6], [5, 5, 6]], point_labels=[1, 0])
    )
    assert clicks.labels[0]["source"] == "clicks" and clicks.labels[0]["index"] == 1
    assert clicks.label.shape == volume.array.shape
    box = segmenter.segment(volume, PromptSet.create(boxes=[[5, 6, 3, 20, 25, 8]]))
    inside = np.zeros(volume.array.shape, dtype=bool)
    inside[5:21, 6:26, 3:9] = True
    assert box.label[inside].any() and not box.label[~inside].any()
    refined = segmenter.segment(  # background clicks alone refine a box
        volume, PromptSet.create(boxes=[[5, 6, 3, 20, 25, 8]], points=[[12, 15, 5]], point_labels=[0])
    )
    assert refined.label[12, 15, 5] == 0 and not refined.label[~inside].any()
    with pytest.raises(ValueError, match="Two boxes reach slice"):
        segmenter.segment(volume, PromptSet.create(boxes=[[5, 6, 3, 20, 25, 8], [1, 1, 8, 4, 4, 10]]))
    with pytest.raises(ValueError, match="Text prompts 'liver' and '1' both name the label 'liver'"):
        segmenter.segment(volume, PromptSet.create(texts=["liver", "1"]))
    free = segmenter.segment(volume, PromptSet.create(texts=["liver", "a strange blob"]))
    assert (
        free.unknown_prompts == ["a strange blob"] and free.labels[1]["index"] == max(segmenter.vocabulary.by_index) + 1
    )


@pytest.mark.parametrize("code", ["LPS", "png"])
def test_clicks_choosing_the_detectors_instances_in_2d_and_3d(segmenter, phantoms, caplog, code: str) -> None:
    """``click_refinement: instances`` with and without text; its Dice is tested on the demo model."""
    instances = VolumeSegmenter(segmenter.predictor, segmenter.vocabulary, click_refinement="instances")
    image = read_image(phantoms[code][0])
    foreground, background = ([30, 20], [5, 5]) if image.is_2d else ([12, 20, 6], [5, 5, 6])
    for texts in (["liver"], None):
        prompts = PromptSet.create(texts=texts, points=[foreground, background], point_labels=[1, 0])
        with caplog.at_level("INFO", logger="scripts.inference"):
            result = instances.segment(image, prompts)
        assert result.label.shape == image.array.shape[: 2 if image.is_2d else 3]
        assert result.label.any() and result.labels[0]["source"] == "clicks"
        tracker = segmenter.segment(image, prompts).label
        assert not np.array_equal(result.label, tracker)  # the instances answered, not the tracker
    assert "Clicks without a text prompt follow the instances of" in caplog.text
    with pytest.raises(ValueError, match="click_refinement must be one of auto, tracker, instances, got 'both'"):
        VolumeSegmenter(segmenter.predictor, segmenter.vocabulary, click_refinement="both")


@pytest.mark.parametrize("code", ["LPS", "png"])
def test_the_image_redraws_only_near_the_clicks(segmenter, phantoms, code: str) -> None:
    """``click_radius_mm``: voxels farther than the radius from every click keep the model's answer, clicked voxels
    are what the click says; its Dice is tested on the demo model. Negative or non-numeric radii are refused."""
    image = read_image(phantoms[code][0])
    points = [[30, 20], [34, 24]] if image.is_2d else [[12, 20, 6], [14, 22, 6]]
    prompts = PromptSet.create(texts=["liver"], points=points, point_labels=[1, 0])
    redraw = VolumeSegmenter(segmenter.predictor, segmenter.vocabulary, click_refinement="tracker", click_radius_mm=4)
    plain, redrawn = segmenter.segment(image, prompts).label, redraw.segment(image, prompts)
    spacing = np.asarray(image.spacing)
    grid = np.indices(plain.shape).reshape(plain.ndim, -1).T
    near = np.zeros(len(grid), dtype=bool)
    for point in points:
        near |= (((grid - point) * spacing) ** 2).sum(axis=1) <= 16
    near = near.reshape(plain.shape)
    changed = redrawn.label != plain
    assert changed.any() and not changed[~near].any() and "click_boundaries" in redrawn.timings
    assert redrawn.label[tuple(points[0])] > 0 and redrawn.label[tuple(points[1])] == 0
    for bad in (-1.0, float("nan"), float("inf"), "6", True):
        with pytest.raises(ValueError, match="click_radius_mm must be a distance"):
            VolumeSegmenter(segmenter.predictor, segmenter.vocabulary, click_radius_mm=bad)


def test_a_click_session_names_its_structure_once(segmenter, phantoms, monkeypatch) -> None:
    """Clicks alone ask every vocabulary prompt on the first foreground click's slice to name the structure. Slicer
    sends all of a session's clicks with each request, so the later requests reuse that answer and ask the followed
    prompt only, with the label map of a segmenter that asks again. Only the first foreground click names the
    structure: a later one on the same slice does not ask again; another first click, or an edited image file,
    does."""
    predictor, vocabulary = segmenter.predictor, segmenter.vocabulary
    session, fresh = (VolumeSegmenter(predictor, vocabulary, click_refinement="instances") for _ in range(2))
    asked: list[str] = []
    text_candidates = predictor.text_candidates

    def counting(encoding, prompts, index):  # noqa: ANN001, ANN202
        asked.extend(prompts)
        return text_candidates(encoding, prompts, index)

    monkeypatch.setattr(predictor, "text_candidates", counting)
    image = read_image(phantoms["LPS"][0])
    first = PromptSet.create(points=[[12, 20, 6]], point_labels=[1])
    session.segment(image, first)
    everything = set(asked)
    assert len(everything) > 50  # the whole vocabulary, canonical prompts
    followed = {prompt for prompt in everything if asked.count(prompt) > 1}  # the lookup, then the refinement
    for points, labels in (
        ([[12, 20, 6], [5, 5, 3]], [1, 0]),
        ([[12, 20, 6], [5, 5, 3], [20, 12, 9]], [1, 0, 1]),
        ([[12, 20, 6], [14, 18, 6]], [1, 1]),
    ):
        prompts = PromptSet.create(points=points, point_labels=labels)
        asked.clear()
        later = session.segment(image, prompts).label
        assert set(asked) == followed
        np.testing.assert_array_equal(later, fresh.segment(image, prompts).label)
    asked.clear()
    session.segment(image, PromptSet.create(points=[[14, 18, 6], [12, 20, 6]], point_labels=[1, 1]))
    assert set(asked) == everything
    asked.clear()
    edited = Path(phantoms["LPS"][0])
    stat = edited.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    session.segment(read_image(edited), first)
    assert set(asked) == everything
    server = VolumeSegmenter(predictor, vocabulary, cache=EncodingCache(2**30), click_refinement="instances")
    for seed in (0, 1):  # images made in memory have no file to key them by: nothing is kept for them
        made = ImageVolume.from_affine(np.random.default_rng(seed).normal(0, 300, SHAPE).astype(np.float32), np.eye(4))
        asked.clear()
        server.segment(made, first)
        assert set(asked) == everything
    assert len(server.cache) == 0


def test_auto_keeps_the_trackers_answer_only_where_it_follows_the_clicks(segmenter, phantoms, caplog) -> None:
    """``click_refinement: auto`` (the default): the tracker's answer stands when it holds every foreground click and
    no background click; otherwise the detector's instances answer, as with ``instances``. The random tracker follows
    some single clicks and not others; both kinds are looked for on a grid of clicks."""
    modes = {
        mode: VolumeSegmenter(segmenter.predictor, segmenter.vocabulary, click_refinement=mode)
        for mode in ("auto", "instances")
    }
    image = read_image(phantoms["LPS"][0])
    seen: set[bool] = set()
    for row, column in itertools.product(range(4, 40, 8), range(4, 36, 8)):
        prompts = PromptSet.create(texts=["liver"], points=[[row, column, 6]], point_labels=[1])
        caplog.clear()
        with caplog.at_level("INFO", logger="scripts.inference"):
            auto = modes["auto"].segment(image, prompts).label
        fell_back = "The tracker's mask contradicts the clicks" in caplog.text
        tracker, instances = (m.segment(image, prompts).label for m in (segmenter, modes["instances"]))
        np.testing.assert_array_equal(auto, instances if fell_back else tracker)
        seen.add(fell_back)
        if seen == {True, False} and not np.array_equal(tracker, instances):
            return
    pytest.fail(f"the grid of clicks did not show both cases with differing answers (fell back: {seen})")


def test_box_results_stay_inside_the_box_on_large_pictures(segmenter, tmp_path) -> None:
    """On a 256 x 256 picture a low-resolution mask cell is 4 pixels: upsampled, a box's mask reached past its edge."""
    picture = read_image(write_phantom(tmp_path, "big", fmt="png", shape=(256, 256, 1))[0])
    box = [60, 70, 150, 171]
    result = segmenter.segment(picture, PromptSet.create(boxes=[box])).label
    inside = np.zeros(result.shape, dtype=bool)
    inside[60:151, 70:172] = True
    assert result[inside].any() and not result[~inside].any()


def test_2d_pictures(segmenter, phantoms, tmp_path) -> None:
    picture = read_image(phantoms["png"][0])
    assert picture.is_2d and picture.array.shape == (64, 80)
    for prompts in (
        PromptSet.create(texts=["liver"]),
        PromptSet.create(points=[[30, 20]]),
        PromptSet.create(boxes=[[10, 10, 40, 50]]),
    ):
        result = segmenter.segment(picture, prompts)
        assert result.label.shape == (64, 80)
    out = write_label(result.label, picture, tmp_path / "picture.png")
    assert read_image(out).array.shape == (64, 80)
    with pytest.raises(ValueError, match="Point .* is outside the image"):
        segmenter.segment(picture, PromptSet.create(points=[[64, 0]]))


def test_points_outside_the_volume(segmenter, phantoms) -> None:
    volume = read_image(phantoms["RAS"][0])
    with pytest.raises(ValueError, match=r"Point \[40, 0, 0\] is outside the image \(shape \(40, 36, 12\)\)"):
        segmenter.segment(volume, PromptSet.create(points=[[40, 0, 0]]))
    with pytest.raises(ValueError, match="Prompt coordinates have 2 dimensions but the image has 3"):
        segmenter.segment(volume, PromptSet.create(points=[[4, 5]]))


def test_bad_files(tmp_path, phantoms) -> None:
    good = phantoms["RAS"][0]
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match="Cannot read image .*truncated.nii.gz"):
        read_image(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    with pytest.raises(ValueError, match="Cannot read image .*garbage.nii.gz"):
        read_image(garbage)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), dtype=np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(ValueError, match="4D images are not supported"):
        read_image(tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((7,), dtype=np.float32), np.eye(4)), tmp_path / "line.nii.gz")
    with pytest.raises(ValueError, match="1D array is not an image"):
        read_image(tmp_path / "line.nii.gz")
    with pytest.raises(ValueError, match="Image not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="Unsupported image format '.txt'"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "empty_dicom").mkdir()
    with pytest.raises(ValueError, match="DICOM folder .* is empty"):
        read_image(tmp_path / "empty_dicom")
    assert good.exists() and read_image(good).array.shape == SHAPE  # inputs are never modified


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_other_planes_map_back_to_the_input_grid(phantoms, plane: str) -> None:
    predictor = Medsam3Predictor(tiny_model(seed=2), batch_size=6, score_threshold=0.0)
    volume = read_image(phantoms["PSR"][0])
    segmenter = VolumeSegmenter(predictor, load_vocabulary(), plane=plane)
    result = segmenter.segment(volume, PromptSet.create(texts=["liver"]))
    assert result.label.shape == volume.array.shape
    # PSR storage: coronal slices run along the file's first axis (P), sagittal along its last (R)
    encoding = segmenter.encode(volume, "liver")
    assert encoding.num_slices == volume.array.shape[{"coronal": 0, "sagittal": 2}[plane]]
    view = SliceView.for_volume(volume, plane)
    logits = predictor.segment_text(encoding, ["liver"])
    expected = view.from_view(predictor.label_map(encoding, logits, [1]))
    np.testing.assert_array_equal(result.label, expected)
