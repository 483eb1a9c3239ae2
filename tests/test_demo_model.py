"""Golden tests of the demo model this pipeline trains (``bundle/configs/demo_train.json``), on held-out phantoms.

The demo model trained on phantom seeds from 1000 up; these phantoms use other seeds, orientations other than RAS and
anisotropic voxels. Behaviour that depends on trained weights (text Dice, clicks that refine, clicks alone,
propagation) is checked here, through the bundle's command line and through the MONAI Label server with 3D Slicer's
payload.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import DEMO_MODEL, bundle_run
from monailabel.client import MONAILabelClient
from monailabel_server import free_port, launch_server

from scripts.clicks import next_click
from scripts.image_io import read_image
from scripts.metrics import dice
from scripts.phantom_dataset import DEMO_FIRST_SEED, HELD_OUT_CASES, HELD_OUT_LABELS, write_held_out_dataset

pytestmark = pytest.mark.slow

LABELS = HELD_OUT_LABELS
EVALUATE = ["inference.json", "demo.json", "evaluate.json"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("held_out")
    assert all(seed < DEMO_FIRST_SEED for *_, seed in HELD_OUT_CASES)
    write_held_out_dataset(root / "images")
    return root


def _evaluate(root: Path, name: str, *args: str) -> dict:
    result = bundle_run(
        "--datalist", str(root / "images" / "datalist.json"), "--output_dir", str(root / name), *args, config=EVALUATE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def with_text(held_out: Path) -> dict:
    return _evaluate(held_out, "with_text")


def _mean(summary: dict, key: str) -> float:
    return float(np.mean([summary[name][key] for name in LABELS.values()]))


def test_the_demo_model_is_the_committed_file() -> None:
    assert DEMO_MODEL.is_file() and DEMO_MODEL.stat().st_size < 20 * 2**20


def test_text_prompts_segment_held_out_organs(with_text: dict) -> None:
    """Regression floor of the shipped demo model (measured 2026-12-02, session 8: 6500 steps on 100 phantoms whose
    kidneys and spleen are outlined by fat, with demo.json's score_threshold 0.5 and score_smoothing 3: liver 0.913,
    spleen 0.733, right kidney 0.883, left kidney 0.913, mean 0.861)."""
    dice = {name: with_text[name]["dice_mean"] for name in LABELS.values()}
    assert dice["liver"] >= 0.88 and dice["spleen"] >= 0.7, dice
    assert dice["right kidney"] >= 0.85 and dice["left kidney"] >= 0.88, dice


def test_the_demo_model_meets_the_text_and_click_targets(with_text: dict) -> None:
    """Issue #9's targets: mean Dice of liver, spleen and kidneys at least 0.85 with text, and at least 0.9 after 5
    clicks with text (0.861 and 0.904 on 2026-12-02)."""
    assert _mean(with_text, "dice_mean") >= 0.85 and _mean(with_text, "dice_5_clicks") >= 0.9


def _assert_clicks_refine(curve: list[float], text: float) -> None:
    """The protocol's first click lands at the structure's centre, mostly inside the text result, so it changes
    little; the corrections that follow raise the Dice."""
    assert curve[0] >= text - 0.01 and curve == sorted(curve) and curve[-1] > max(curve[0], text) + 0.01, (curve, text)


def test_clicks_refine_the_text_result(with_text: dict) -> None:
    """Measured 2026-12-02, session 8, with demo.json (``click_refinement: instances``, ``click_radius_mm`` 6): text
    0.861, then 0.862 / 0.887 / 0.904 after 1 / 3 / 5 clicks. Clicks pick only instances scoring at least half the
    threshold: without that floor the detector's unused queries (scores near 0.001) held a blob under a click beside
    the right kidney, carried over every slice, and the curve fell (0.737 / 0.713 on an earlier model)."""
    curve = [_mean(with_text, f"dice_{count}_clicks") for count in (1, 3, 5)]
    _assert_clicks_refine(curve, _mean(with_text, "dice_mean"))
    for name in LABELS.values():
        text = with_text[name]["dice_mean"]
        assert all(with_text[name][f"dice_{count}_clicks"] >= text - 0.05 for count in (1, 3, 5)), with_text[name]
        assert with_text[name]["dice_5_clicks"] >= text - 0.01, with_text[name]


def test_clicks_redraw_the_boundary_near_them(held_out: Path, with_text: dict) -> None:
    """What ``click_radius_mm`` (demo.json: 6) adds: without it the clicks only choose among the detector's instances,
    which already hold the organs, and each click changes little more than its own voxel (0.862 / 0.864 after 3 / 5
    clicks on 2026-12-02, against 0.887 / 0.904 with it)."""
    instances_only = _evaluate(held_out, "instances_only", "--click_radius_mm", "0", "--interactive_clicks", "[3, 5]")
    for count, gain in ((3, 0.015), (5, 0.03)):
        with_radius, without = _mean(with_text, f"dice_{count}_clicks"), _mean(instances_only, f"dice_{count}_clicks")
        assert with_radius >= without + gain, (count, with_radius, without)


def test_auto_clicks_refine_where_the_tracker_never_learnt_them(held_out: Path, with_text: dict) -> None:
    """``click_refinement: auto`` (inference.json's default) on the demo model, whose tracker was never trained: its
    answers contradict the clicks, so the detector's instances answer and the clicks still refine the text result
    as with ``instances`` (above). On an earlier demo model ``tracker`` gave 0.595 / 0.600 where text gave 0.656."""
    auto = _evaluate(held_out, "auto", "--click_refinement", "auto", "--interactive_clicks", "[1, 3]")
    curve = [_mean(auto, f"dice_{count}_clicks") for count in (1, 3)]
    _assert_clicks_refine(curve, _mean(with_text, "dice_mean"))
    for name in LABELS.values():
        text = with_text[name]["dice_mean"]
        assert all(auto[name][f"dice_{count}_clicks"] >= text - 0.05 for count in (1, 3)), auto[name]


@pytest.fixture(scope="module")
def clicks_alone(held_out: Path) -> dict:
    return _evaluate(held_out, "clicks_only", "--interactive_text", "false", "--interactive_clicks", "[1, 3]")


def test_clicks_alone_reach_the_target_after_three_clicks(clicks_alone: dict) -> None:
    """Issue #9's target for clicks without text: mean Dice at least 0.8 after 3 clicks. Measured 2026-12-01,
    session 4: 0.736 after 1 click, 0.808 after 3 (the model before: 0.68 and 0.72)."""
    curve = [_mean(clicks_alone, f"dice_{count}_clicks") for count in (1, 3)]
    assert curve[0] < curve[1] and curve[1] >= 0.8, curve


def test_clicks_alone_name_structures_read_in_another_window(held_out: Path) -> None:
    """Clicks without text on the vertebrae (CT bone window) and the aorta (CT vessel window): every label is looked
    up on the clicked slice in its own intensity preset. Measured 2026-12-01, session 5, on the two held-out CTs:
    vertebrae 0.30 / 0.50 after 1 click and 0.68 / 0.81 after 3, aorta 0.91 / 0.94 after 1; when only the labels of
    the default (abdomen) window were asked, 0.002 to 0.014 for both. The MR (one preset): 0.82 and 0.91 either way."""
    labels = json.dumps({"5": "vertebrae", "6": "aorta"})
    _evaluate(
        held_out, "other_windows", "--labels", labels, "--interactive_text", "false", "--interactive_clicks", "[1, 3]"
    )
    with (held_out / "other_windows" / "interactive.csv").open() as rows:
        dice = {(Path(r["image"]).name, r["name"], int(r["clicks"])): float(r["dice"]) for r in csv.DictReader(rows)}
    for case in ("ct_lps", "ct_psr", "mr_ila"):
        image = f"{case}.nii.gz"
        assert dice[(image, "aorta", 1)] >= 0.85 and dice[(image, "vertebrae", 3)] >= 0.6, dice


def test_presence_gating_leaves_every_label_map_unchanged(held_out: Path) -> None:
    """The whole vocabulary on a held-out phantom: with the mask head gated by the presence score, the label map is
    the one every (label, slice) pair through the mask head gives, with demo.json's threshold and smoothing. The demo
    model learnt "not here" for the labels no phantom shows, so most pairs are gated out: the label map shows the six
    phantom labels only."""
    from unittest import mock

    from scripts.checkpoint import load_checkpoint
    from scripts.inference import VolumeSegmenter
    from scripts.model_builder import build_medsam3
    from scripts.network import MedSam3Detector
    from scripts.orientation import SliceView
    from scripts.predictor import Medsam3Predictor
    from scripts.prompts import PromptSet
    from scripts.vocabulary import load_vocabulary

    model = build_medsam3("tiny", device="cpu")
    load_checkpoint(model, DEMO_MODEL)
    vocabulary = load_vocabulary()
    prompts = PromptSet.create(texts=[entry.name for entry in vocabulary])
    image = read_image(held_out / "images" / "ct_lps.nii.gz")
    masked, heads = [], MedSam3Detector._run_segmentation_heads

    def counting(self, **kwargs):  # noqa: ANN001, ANN003
        masked.append(len(kwargs["img_ids"]))
        return heads(self, **kwargs)

    def ungated(self, backbone_out, find_input, threshold):  # noqa: ANN001, ARG001
        return self.forward_grounding(backbone_out, find_input, None, None)

    demo = json.loads((DEMO_MODEL.parents[1] / "configs" / "demo.json").read_text())
    options = {key: demo[key] for key in ("score_threshold", "score_smoothing")}  # the gate is lower with smoothing
    with mock.patch.object(MedSam3Detector, "_run_segmentation_heads", counting):
        gated = VolumeSegmenter(Medsam3Predictor(model, **options), vocabulary).segment(image, prompts)
    with mock.patch.object(MedSam3Detector, "forward_presence_gated", ungated):
        plain = VolumeSegmenter(Medsam3Predictor(model, **options), vocabulary).segment(image, prompts)
    pairs = len(vocabulary) * SliceView.for_volume(image).to_view(image.array).shape[0]
    assert np.array_equal(gated.label, plain.label) and gated.label.any()
    assert 0 < sum(masked) < pairs / 4, (sum(masked), pairs)
    assert set(np.unique(gated.label)) - {0} == set(range(1, 7)), np.unique(gated.label)  # the phantom's six


@pytest.fixture(scope="module")
def server(held_out: Path, tmp_path_factory) -> Iterator[str]:
    studies = tmp_path_factory.mktemp("studies")
    for name, *_ in HELD_OUT_CASES:
        (studies / f"{name}.nii.gz").write_bytes((held_out / "images" / f"{name}.nii.gz").read_bytes())
    conf = ["--conf", "configs", "demo.json"]  # the demo.json the command line uses
    yield from launch_server(tmp_path_factory.mktemp("server"), studies, free_port(), *conf)


def test_slicer_clicks_and_the_command_line_agree(held_out: Path, server: str, tmp_path: Path) -> None:
    """Three protocol clicks sent as Slicer sends them; the same clicks on the command line give the same Dice."""
    client = MONAILabelClient(server)
    target = read_image(held_out / "images" / "ct_psr_label.nii.gz").array == 1  # the liver
    spacing = read_image(held_out / "images" / "ct_psr.nii.gz").spacing
    foreground, background, prediction = [], [], np.zeros_like(target)
    for _ in range(3):
        point, label = next_click(prediction, target, spacing)
        (foreground if label else background).append([int(v) for v in point])
        params = {"label": "liver", "foreground": foreground, "background": background, "text": ""}
        result_file, _ = client.infer("medsam3_clicks", "ct_psr", {**params, "result_extension": ".nrrd"})
        prediction = read_image(result_file).array > 0
    server_dice = dice(prediction, target)

    points = foreground + background
    labels = [1] * len(foreground) + [0] * len(background)
    result = bundle_run(
        "--image", str(held_out / "images" / "ct_psr.nii.gz"), "--prompts", "['liver']",
        "--points", str(points), "--point_labels", str(labels), "--output_dir", str(tmp_path),
        config=["inference.json", "demo.json"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cli_dice = dice(read_image(tmp_path / "ct_psr.nii.gz").array == 1, target)
    assert abs(server_dice - cli_dice) <= 0.01 and server_dice > 0.3, (server_dice, cli_dice)
