"""Tracker training: simulated sessions on slice clips (prompted rounds, then propagation), matching the predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_slices, tiny_model

from scripts.click_training import (
    ClickPromptLoss,
    ClickSimulation,
    corrective_points,
    low_res_targets,
    simulate_tracking,
)
from scripts.clicks import next_click
from scripts.cpu_compat import device_fallbacks
from scripts.model_sizes import MODEL_SIZES
from scripts.network import MedSam3, find_stage
from scripts.predictor import Medsam3Predictor

CPU = torch.device("cpu")
SIZE = MODEL_SIZES["tiny"].image_size  # 224
LOW = 4 * MODEL_SIZES["tiny"].feature_size  # 64, the low-res logit grid


def _disc(centre: tuple[float, float], radius: float, size: int = SIZE) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) < radius**2).float()


def _model_input(slices: torch.Tensor) -> torch.Tensor:
    """What the predictor feeds the model: resized to the model's input and normalised with SAM3's 0.5/0.5."""
    return (F.interpolate(slices, size=(SIZE, SIZE), mode="bilinear", align_corners=False) - 0.5) / 0.5


def _present_model() -> MedSam3:
    """The tiny model in eval mode, its object score biased up: random weights would hide every mask (-1024)."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.tracker.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    return model


def _sam2_features(model: MedSam3, images: torch.Tensor) -> dict:
    with torch.no_grad():
        return model.detector.backbone.forward_image(images)["sam2_backbone_out"]


def test_first_click_matches_the_predictor() -> None:
    """A single click's first-round logits are those of ``Medsam3Predictor.segment_clicks`` on that slice."""
    model = _present_model()
    slices = random_slices(num=1, height=LOW, width=LOW)  # slice pixel (r, c) = low-res cell (r, c)
    target = _disc((90, 130), 35)[None]
    with torch.no_grad(), device_fallbacks(CPU):
        simulation = ClickSimulation(rounds=1, box_probability=0.0, text_probability=0.0)
        out = model(_model_input(slices), ["liver"], target, simulation)
    first = out["click_rounds"][0]
    assert first["point_labels"].tolist() == [[1]] and first["mask_logits"].shape[1] == 3  # multimask, one click
    x, y = first["point_coords"][0, 0].tolist()
    row, col = round(y * LOW / SIZE - 0.5), round(x * LOW / SIZE - 0.5)

    predictor = Medsam3Predictor(model, batch_size=1)
    expected = predictor.segment_clicks(predictor.encode(slices), np.array([[0, row, col]]), np.array([1]))
    ours = first["best_mask_logits"][0, 0]
    torch.testing.assert_close(ours.half().float(), expected.logits[0].float(), atol=1e-4, rtol=2e-3)
    assert (ours > 0).any()  # the comparison is not between two empty masks


def test_first_box_matches_the_predictor() -> None:
    """An unjittered box's first-round logits are ``segment_boxes``' inside the box window it keeps."""
    model = _present_model()
    slices = random_slices(num=1, height=SIZE, width=SIZE)
    target = torch.zeros(1, SIZE, SIZE)
    target[0, 60:131, 80:161] = 1
    simulation = ClickSimulation(rounds=1, box_probability=1.0, text_probability=0.0, box_jitter=0.0)
    with torch.no_grad(), device_fallbacks(CPU):
        out = model(_model_input(slices), ["liver"], target, simulation)
    first = out["click_rounds"][0]
    assert first["point_labels"].tolist() == [[2, 3]]
    assert first["point_coords"][0].tolist() == [[80.0, 60.0], [161.0, 131.0]]  # pixel edges (x, y)

    predictor = Medsam3Predictor(model, batch_size=1)
    expected = predictor.segment_boxes(predictor.encode(slices), {0: (60, 80, 130, 160)}).logits[0].float()
    inside = expected > -1e4
    assert inside.any() and not inside.all()
    ours = first["best_mask_logits"][0, 0].half().float()
    torch.testing.assert_close(ours[inside], expected[inside], atol=1e-4, rtol=2e-3)
    assert (ours[inside] > 0).any()


def test_corrective_click_goes_to_the_largest_error() -> None:
    """Foreground click in a missed region, background click in an over-segmented one, at cell centres."""
    reference = low_res_targets(_disc((100, 100), 60)[None], LOW).bool().numpy()
    missed = torch.from_numpy(np.where(reference, 1.0, -1.0)).float()
    missed[0, :, :30] = -1.0  # the left part of the disc is missed
    over = torch.from_numpy(np.where(reference, 1.0, -1.0)).float()
    over[0, 45:60, 45:60] = 1.0  # a blob outside the disc

    for logits, label in ((missed, 1), (over, 0)):
        coords, labels = corrective_points(logits, reference, SIZE)
        (row, col), expected_label = next_click(logits[0].numpy() > 0, reference[0], (1.0, 1.0))
        assert labels.tolist() == [[label]] and expected_label == label
        assert coords.tolist() == [[[(col + 0.5) * SIZE / LOW, (row + 0.5) * SIZE / LOW]]]
        error = reference[0] != (logits[0].numpy() > 0)
        assert error[row, col] and (reference[0][row, col] == bool(label))


def test_each_round_adds_the_click_next_click_gives() -> None:
    model = tiny_model()
    features = _sam2_features(model, _model_input(random_slices(num=2, height=SIZE, width=SIZE)))
    targets = torch.stack(
        [_disc((80, 90), 30), _disc((140, 120), 45), torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE)]
    )
    model.train()
    simulation = ClickSimulation(rounds=4, text_probability=0.0)
    rounds = simulate_tracking(model.tracker, features, targets, 1, simulation, np.random.default_rng(1))
    assert len(rounds) == 4
    reference = low_res_targets(targets, LOW)[:2].bool().numpy()
    for before, after in zip(rounds, rounds[1:], strict=False):
        assert after["pairs"].tolist() == [0, 1]  # the empty target is never clicked
        assert after["point_coords"].shape[1] == before["point_coords"].shape[1] + 1
        torch.testing.assert_close(after["point_coords"][:, :-1], before["point_coords"])
        predicted = (before["best_mask_logits"][:, 0] > 0).numpy()
        for pair in range(2):  # the full-grid protocol of the interactive evaluation
            (row, col), label = next_click(predicted[pair], reference[pair], (1.0, 1.0))
            xy = [(col + 0.5) * SIZE / LOW, (row + 0.5) * SIZE / LOW]
            assert after["point_coords"][pair, -1].tolist() == xy and after["point_labels"][pair, -1] == label
        assert after["best_mask_logits"].requires_grad


def test_rounds_are_reproducible_from_the_seeds() -> None:
    model = tiny_model()
    features = _sam2_features(model, _model_input(random_slices(num=1, height=SIZE, width=SIZE)))
    targets = _disc((100, 110), 40)[None]
    simulation = ClickSimulation(rounds=2, box_probability=1.0, text_probability=0.0)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(3)  # no generator given: the jitter is seeded from torch's RNG
        rounds = simulate_tracking(model.tracker.eval(), features, targets, 1, simulation)
        return [r[k] for r in rounds for k in ("point_coords", "point_labels", "best_mask_logits")]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[0][0, 0].tolist() != [70.0, 60.0]  # jittered, not the exact box


def test_loss_trains_the_sam_heads_through_forward() -> None:
    """One training forward: a finite loss whose gradients reach the prompt encoder, mask decoder and SAM 2 neck."""
    model = tiny_model().train()
    images = _model_input(random_slices(num=2, height=SIZE, width=SIZE))
    targets = torch.stack([_disc((80, 90), 30), _disc((140, 120), 45), torch.zeros(SIZE, SIZE), _disc((60, 60), 20)])
    with device_fallbacks(CPU):
        out = model(images, ["liver", "spleen"], targets, ClickSimulation(rounds=2), np.random.default_rng(0))
        terms = ClickPromptLoss()(out, targets)
    assert set(terms) == {"click_mask", "click_iou", "click_object", "loss"}
    assert all(torch.isfinite(v) for v in terms.values()) and terms["loss"] > 0
    terms["loss"].backward()
    for module in (model.tracker.sam_mask_decoder, model.tracker.sam_prompt_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    sam2_neck = model.detector.backbone.vision_backbone.sam2_convs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sam2_neck.parameters())


def test_loss_decreases_on_a_fixed_slice() -> None:
    model = tiny_model()
    features = _sam2_features(model, _model_input(random_slices(num=1, height=SIZE, width=SIZE, seed=4)))
    targets = _disc((100, 120), 45)[None]
    tracker = model.tracker.train()
    optimiser = torch.optim.Adam(tracker.parameters(), lr=3e-3)
    loss_fn, generator, simulation = ClickPromptLoss(), np.random.default_rng(0), ClickSimulation(rounds=2)
    losses = []
    for _ in range(60):  # it first drops to "all background", then learns the disc
        rounds = simulate_tracking(tracker, features, targets, 1, simulation, generator)
        loss = loss_fn({"click_rounds": rounds}, targets)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_forward_without_click_targets_is_the_detector_path() -> None:
    """No click targets: exactly the detector's outputs; with them, the detector outputs do not change."""
    model = tiny_model().eval()
    images = _model_input(random_slices(num=2, height=SIZE, width=SIZE))
    prompts = ["liver", "spleen"]
    with torch.no_grad(), device_fallbacks(CPU):
        backbone_out = model.detector.backbone.forward_image(images)
        backbone_out.update(model.detector.backbone.forward_text(prompts, device=CPU))
        img_ids, text_ids = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
        expected = model.detector.forward_grounding(
            backbone_out=backbone_out,
            find_input=find_stage(img_ids, text_ids),
            find_target=None,
            geometric_prompt=None,
        )
        plain = model(images, prompts)
        clicked = model(images, prompts, torch.stack([_disc((100, 100), 30)] * 4), ClickSimulation(rounds=1))
    assert "click_rounds" not in plain and len(clicked["click_rounds"]) == 1
    for key in ("pred_logits", "pred_masks", "pred_boxes", "presence_logit_dec", "semantic_seg"):
        assert torch.equal(plain[key], expected[key]), key
        assert torch.equal(clicked[key], expected[key]), key


def test_empty_targets_give_no_rounds_and_a_zero_loss_with_a_graph() -> None:
    model = tiny_model().train()
    targets = torch.zeros(2, SIZE, SIZE)
    targets[0, 10, 10] = 1  # one pixel: too small for a low-res cell, so not clickable either
    with device_fallbacks(CPU):
        out = model(_model_input(random_slices(num=1, height=SIZE, width=SIZE)), ["liver", "spleen"], targets)
        terms = ClickPromptLoss()(out, targets)
    assert out["click_rounds"] == []
    assert terms["loss"].item() == 0.0 and terms["loss"].requires_grad
    terms["loss"].backward()


def test_bad_settings_and_shapes_raise() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        ClickSimulation(rounds=0)
    with pytest.raises(ValueError, match=r"box_probability must be in \[0, 1\]"):
        ClickSimulation(box_probability=1.5)
    with pytest.raises(ValueError, match="box_jitter must be >= 0"):
        ClickSimulation(box_jitter=-0.1)
    model = tiny_model()
    features = _sam2_features(model, _model_input(random_slices(num=1, height=SIZE, width=SIZE)))
    with pytest.raises(ValueError, match=r"targets for clips of 1 among 1 images, got \(224, 224\)"):
        simulate_tracking(model.tracker, features, torch.zeros(SIZE, SIZE), 1, ClickSimulation())
    with pytest.raises(ValueError, match="box_probability \\+ text_probability must be at most 1"):
        ClickSimulation(box_probability=0.6, text_probability=0.6)


def _clip_targets(present: list[bool]) -> torch.Tensor:
    """One prompt on one clip: a disc shrinking slice by slice where ``present``, empty elsewhere."""
    return torch.stack(
        [_disc((110, 110), 50 - 6 * t) if on else torch.zeros(SIZE, SIZE) for t, on in enumerate(present)]
    )


def test_tracking_propagates_through_the_clip_and_trains_the_memory() -> None:
    """Prompted rounds on slice 0, then slices 1..K-1 from memory; gradients reach memory attention and encoder."""
    model = tiny_model().train()
    images = _model_input(random_slices(num=4, height=SIZE, width=SIZE))
    targets = _clip_targets([True, True, True, False])
    simulation = ClickSimulation(rounds=2, text_probability=0.0, second_prompt_probability=1.0)
    with device_fallbacks(CPU):
        out = model(images, ["liver"], targets, simulation, np.random.default_rng(0), clip=4)
        terms = ClickPromptLoss()(out, targets)
    records = out["click_rounds"]
    # the last slice does not show the structure, so it is not prompted: one prompted slice, then propagation
    assert [int(r["frame"]) for r in records] == [0, 0, 1, 2, 3]
    assert [r["pairs"].tolist() for r in records] == [[0], [0], [1], [2], [3]]
    assert "point_coords" not in records[2] and records[2]["mask_logits"].shape[1] == 3  # multimask when tracking
    assert terms["click_object"] > 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    tracker = model.tracker
    for module in (tracker.transformer.encoder, tracker.maskmem_backbone, tracker.obj_ptr_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module


def test_two_prompted_slices_when_both_show_the_structure() -> None:
    model = tiny_model().train()
    features = _sam2_features(model, _model_input(random_slices(num=4, height=SIZE, width=SIZE)))
    targets = _clip_targets([True] * 4)
    simulation = ClickSimulation(rounds=2, text_probability=0.0, second_prompt_probability=1.0)
    with device_fallbacks(CPU):
        records = simulate_tracking(model.tracker, features, targets, 4, simulation, np.random.default_rng(0))
    assert [int(r["frame"]) for r in records] == [0, 0, 3, 3, 1, 2]


def test_text_first_prompt_feeds_the_text_result_as_previous_mask() -> None:
    """A text-first session gives the click with the detector's mask, as clicks refining a text result do."""
    model = _present_model()
    features = _sam2_features(model, _model_input(random_slices(num=1, height=SIZE, width=SIZE)))
    targets = _disc((100, 100), 40)[None]
    text = torch.full((1, LOW, LOW), -1e4)
    text[0, 10:30, 10:30] = 8.0
    only_text = ClickSimulation(rounds=1, box_probability=0.0, text_probability=1.0)
    only_click = ClickSimulation(rounds=1, box_probability=0.0, text_probability=0.0)
    with torch.no_grad(), device_fallbacks(CPU):
        with_text = simulate_tracking(model.tracker, features, targets, 1, only_text, np.random.default_rng(0), text)
        plain = simulate_tracking(model.tracker, features, targets, 1, only_click, np.random.default_rng(0), text)
    assert torch.equal(with_text[0]["point_coords"], plain[0]["point_coords"])
    assert not torch.equal(with_text[0]["best_mask_logits"], plain[0]["best_mask_logits"])


def test_object_score_learns_where_the_structure_ends() -> None:
    """Training the tracker on one clip: the object score rises on slices showing the disc and falls past it."""
    torch.manual_seed(0)
    model = tiny_model()
    features = _sam2_features(model, _model_input(random_slices(num=4, height=SIZE, width=SIZE, seed=5)))
    targets = _clip_targets([True, True, False, False])
    tracker = model.tracker.train()
    optimiser = torch.optim.Adam(tracker.parameters(), lr=3e-3)
    simulation = ClickSimulation(rounds=1, text_probability=0.0)
    generator = np.random.default_rng(0)
    for _ in range(40):
        with device_fallbacks(CPU):
            records = simulate_tracking(tracker, features, targets, 4, simulation, generator)
            loss = ClickPromptLoss()({"click_rounds": records}, targets)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    scores = {int(r["frame"]): float(r["object_score_logits"].sigmoid()) for r in records}
    assert scores[0] > 0.5 and scores[1] > 0.5 and scores[2] < 0.5 and scores[3] < 0.5, scores
