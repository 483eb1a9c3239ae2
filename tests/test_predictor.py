"""The predictor on the tiny model: batching, prompt bookkeeping, propagation and label assembly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_slices, tiny_model

from scripts.predictor import EMPTY_LOGIT, Medsam3Predictor, PromptResult
from scripts.presence_pass import PRESENCE_MARGIN, smoothed_scores

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def test_encode_validates_and_keeps_slice_size(model) -> None:
    predictor = Medsam3Predictor(model, batch_size=4)
    encoding = predictor.encode(random_slices(5, 30, 50))
    assert encoding.trunk.shape[0] == 5 and (encoding.height, encoding.width) == (30, 50)
    with pytest.raises(ValueError, match=r"Expected slices as D x 3 x H x W, got shape \(5, 30, 50\)"):
        predictor.encode(torch.zeros(5, 30, 50))
    with pytest.raises(ValueError, match="No slices to encode"):
        predictor.encode(torch.zeros(0, 3, 30, 50))


def test_text_results_do_not_depend_on_batching(model) -> None:
    slices = random_slices(5)
    one = Medsam3Predictor(model, batch_size=1, score_threshold=0.0)
    many = Medsam3Predictor(model, batch_size=6, score_threshold=0.0)
    single = [one.segment_text(one.encode(slices), [p])[0] for p in ("liver", "spleen", "aorta")]
    joint = many.segment_text(many.encode(slices), ["liver", "spleen", "aorta"])
    for a, b in zip(single, joint, strict=True):
        torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)
    # different prompts give different answers: the prompt reaches the heads
    assert not torch.equal(joint[0].logits, joint[1].logits)


def test_score_threshold_drops_instances(model) -> None:
    predictor = Medsam3Predictor(model, score_threshold=1.0)
    result = predictor.segment_text(predictor.encode(random_slices(3)), ["liver"])[0]
    assert (result.logits == EMPTY_LOGIT).all()  # nothing scores above 1.0
    assert (result.scores > 0).all()  # but the best score is still reported
    with pytest.raises(ValueError, match="No text prompts given"):
        predictor.segment_text(predictor.encode(random_slices(1)), [])


def test_text_candidates_are_the_instances_a_text_result_keeps(model) -> None:
    """Clicks choose among :meth:`text_candidates` (``click_refinement: instances``): the ones scoring above the
    threshold are exactly the text result's, whatever their score the others are there too."""
    predictor = Medsam3Predictor(model, score_threshold=0.3)
    encoding = predictor.encode(random_slices(4))
    result = predictor.segment_text(encoding, ["liver"])[0]
    both = predictor.segment_text(encoding, ["liver", "spleen"])
    for index in range(4):
        masks, scores = predictor.text_candidates(encoding, ["spleen", "liver"], index)
        assert masks.shape == (2, model.size.num_queries, predictor.low_res, predictor.low_res)
        torch.testing.assert_close(scores[0].max(), both[1].scores[index], atol=1e-5, rtol=1e-4)  # prompts batched
        masks, scores = masks[1], scores[1]
        assert (masks > EMPTY_LOGIT).all()  # every instance has its mask, not only those passing the presence gate
        kept = masks[scores > 0.3]
        union = kept.amax(dim=0).clamp_min(EMPTY_LOGIT) if len(kept) else torch.full_like(masks[0], EMPTY_LOGIT)
        torch.testing.assert_close(union, result.logits[index].float(), atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(scores.max(), result.scores[index], atol=1e-5, rtol=1e-4)


def test_text_encodings_are_cached(model) -> None:
    predictor = Medsam3Predictor(model)
    encoding = predictor.encode(random_slices(2))
    predictor.segment_text(encoding, ["liver"])
    first = predictor.timer.seconds["text_encoder"]
    predictor.segment_text(encoding, ["liver"])
    assert predictor.timer.seconds["text_encoder"] == first
    predictor.segment_text(encoding, ["liver", "kidney"])
    assert predictor.timer.seconds["text_encoder"] > first


def test_clicks_propagate_both_ways(model) -> None:
    predictor = Medsam3Predictor(model, max_empty_slices=None)
    encoding = predictor.encode(random_slices(7))
    result = predictor.segment_clicks(encoding, np.array([[3, 10, 10], [3, 20, 30]]), np.array([1, 0]))
    assert result.logits.shape == (7, 64, 64)
    assert (result.scores > 0).all()  # every slice was visited, before and after the clicked one


def _fixed_object_score(logit: float) -> torch.nn.Module:
    """A tiny model whose tracker gives every slice the object-score ``logit`` (< 0: "absent")."""
    fixed = tiny_model()
    last = fixed.tracker.sam_mask_decoder.pred_obj_score_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)
    return fixed


@pytest.mark.parametrize(("limit", "visited"), [(2, [2, 3, 4, 5, 6]), (1, [3, 4, 5])])
def test_propagation_stops_after_empty_slices(limit: int, visited: list[int]) -> None:
    """An absent object ends propagation after ``max_empty_slices`` slices each way from the clicked one."""
    predictor = Medsam3Predictor(_fixed_object_score(-10.0), max_empty_slices=limit)
    result = predictor.segment_clicks(predictor.encode(random_slices(9)), np.array([[4, 10, 10]]), np.array([1]))
    assert (result.scores > 0).nonzero().flatten().tolist() == visited


def test_clicks_keep_initial_result_where_propagation_stops(model) -> None:
    predictor = Medsam3Predictor(model, max_empty_slices=1)
    encoding = predictor.encode(random_slices(9))
    initial = PromptResult(logits=torch.full((9, 64, 64), 5.0, dtype=torch.float16), scores=torch.full((9,), 0.9))
    result = predictor.segment_clicks(encoding, np.array([[4, 10, 10]]), np.array([1]), initial=initial)
    untouched = [i for i in range(9) if torch.equal(result.logits[i], initial.logits[i])]
    assert untouched and 4 not in untouched


def test_box_mask_stays_in_box(model) -> None:
    predictor = Medsam3Predictor(model)
    encoding = predictor.encode(random_slices(3, 64, 64))
    result = predictor.segment_boxes(encoding, {1: (10, 20, 30, 40)})
    assert (result.logits[[0, 2]] == EMPTY_LOGIT).all()
    outside = result.logits[1].clone()
    outside[9:32, 19:42] = EMPTY_LOGIT  # the box plus one low-res pixel of border
    assert (outside == EMPTY_LOGIT).all()


def test_label_map_assembly() -> None:
    model = tiny_model(seed=1)
    predictor = Medsam3Predictor(model, batch_size=2)
    encoding = predictor.encode(random_slices(3, 32, 48))
    low = 64
    a = torch.full((3, low, low), EMPTY_LOGIT, dtype=torch.float16)
    b = a.clone()
    a[:, :, : low // 2] = 4.0  # left half of every slice
    b[1, :, :] = 2.0  # all of slice 1, weaker than a where both are present
    label = predictor.label_map(encoding, [PromptResult(a, torch.ones(3)), PromptResult(b, torch.ones(3))], [5, 300])
    assert label.shape == (3, 32, 48) and label.dtype == np.uint16
    assert (label[0, :, :23] == 5).all() and (label[0, :, 25:] == 0).all()
    assert (label[1, :, :23] == 5).all() and (label[1, :, 25:] == 300).all()
    with pytest.raises(ValueError, match="2 results but 1 label values"):
        predictor.label_map(encoding, [PromptResult(a, torch.ones(3))] * 2, [1])


def test_constructor_validation(model) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Medsam3Predictor(model, batch_size=0)
    with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\]"):
        Medsam3Predictor(model, score_threshold=2)


def test_text_results_are_kept_on_the_encoding(model) -> None:
    predictor = Medsam3Predictor(model, score_threshold=0.2)
    encoding = predictor.encode(random_slices(3))
    before = encoding.nbytes()
    first = predictor.segment_text(encoding, ["liver"])[0]
    heads = predictor.timer.seconds["heads"]
    assert predictor.segment_text(encoding, ["liver"])[0] is first and predictor.timer.seconds["heads"] == heads
    assert encoding.nbytes() > before  # the cache accounts for kept results
    clicks = predictor.segment_clicks(encoding, np.array([[1, 5, 5]]), np.array([1]), initial=first)
    assert clicks.logits is not first.logits  # refining never edits the kept text result
    predictor.score_threshold = 0.9
    assert predictor.segment_text(encoding, ["liver"])[0] is not first  # another threshold, another result
    predictor.score_threshold, predictor.score_smoothing = 0.2, 3
    assert predictor.segment_text(encoding, ["liver"])[0] is not first  # another smoothing, another result


def test_at_most_sixteen_clicks_of_a_slice_reach_the_heads(model) -> None:
    """As upstream's video predictor: the first eight and the latest eight clicks of a slice are used."""
    predictor = Medsam3Predictor(model, max_empty_slices=None)
    encoding = predictor.encode(random_slices(3))
    rng = np.random.default_rng(0)
    points = np.column_stack([np.ones(20, dtype=int), rng.integers(0, 40, 20), rng.integers(0, 48, 20)])
    labels = rng.integers(0, 2, 20)
    labels[0] = 1
    all_clicks = predictor.segment_clicks(encoding, points, labels)
    kept = np.r_[0:8, 12:20]
    expected = predictor.segment_clicks(encoding, points[kept], labels[kept])
    assert torch.equal(all_clicks.logits, expected.logits)
    fewer = predictor.segment_clicks(encoding, points[:15], labels[:15])
    assert not torch.equal(fewer.logits, predictor.segment_clicks(encoding, points[:14], labels[:14]).logits)


def test_presence_gating_changes_no_text_result(model) -> None:
    """The mask head runs only for pairs with an instance above the threshold, and every result is as ungated."""
    from unittest import mock

    from scripts.network import MedSam3Detector

    slices = random_slices(4)
    prompts = ["liver", "spleen", "aorta", "left kidney"]
    probe = Medsam3Predictor(model, batch_size=8, score_threshold=0.0)
    best = torch.stack([r.scores for r in probe.segment_text(probe.encode(slices), prompts)])  # prompts x slices
    threshold = float(best.flatten().median())  # about half the (prompt, slice) pairs pass

    def ungated(self, backbone_out, find_input, threshold):  # noqa: ANN001, ARG001
        return self.forward_grounding(backbone_out, find_input, None, None)

    masked_pairs = []
    heads = MedSam3Detector._run_segmentation_heads

    def counting(self, **kwargs):  # noqa: ANN001, ANN003
        masked_pairs.append(len(kwargs["img_ids"]))
        return heads(self, **kwargs)

    gated = Medsam3Predictor(model, batch_size=8, score_threshold=threshold)
    with mock.patch.object(MedSam3Detector, "_run_segmentation_heads", counting):
        results = gated.segment_text(gated.encode(slices), prompts)
    assert 0 < sum(masked_pairs) < best.numel()  # some pairs skipped the mask head, some did not
    plain = Medsam3Predictor(model, batch_size=8, score_threshold=threshold)
    with mock.patch.object(MedSam3Detector, "forward_presence_gated", ungated):
        expected = plain.segment_text(plain.encode(slices), prompts)
    for ours, theirs in zip(results, expected, strict=True):
        assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.scores, theirs.scores)


def test_score_smoothing_decides_which_slices_show_a_prompt_from_their_neighbours(model) -> None:
    """With ``score_smoothing`` 3 a slice shows a prompt when the mean of its and its neighbours' scores passes the
    threshold: slices that pass both ways keep exactly their own masks, a slice that passes only by the mean keeps
    its best instance, and a slice that passes only by itself is dropped."""
    slices = random_slices(12)
    prompts = ["liver", "spleen", "aorta", "left kidney", "right kidney", "vertebrae"]
    probe = Medsam3Predictor(model, batch_size=8, score_threshold=0.0)
    encoding = probe.encode(slices)
    raw = torch.stack([r.scores for r in probe.segment_text(encoding, prompts)])  # prompts x slices
    mean = smoothed_scores(raw, 3)
    threshold = float(raw.flatten().median())
    plain = Medsam3Predictor(model, batch_size=8, score_threshold=threshold)
    smooth = Medsam3Predictor(model, batch_size=8, score_threshold=threshold, score_smoothing=3)
    expected, results = (p.segment_text(p.encode(slices), prompts) for p in (plain, smooth))
    shown, alone = mean > threshold, raw > threshold
    by_mean = shown & ~alone & (raw > PRESENCE_MARGIN * threshold)
    assert (shown & alone).any() and (alone & ~shown).any() and by_mean.any()  # every case is exercised
    for p, (ours, theirs) in enumerate(zip(results, expected, strict=True)):
        torch.testing.assert_close(ours.scores, mean[p], atol=1e-5, rtol=1e-4)
        assert (ours.logits[~shown[p]] == EMPTY_LOGIT).all()
        both = shown[p] & alone[p]
        torch.testing.assert_close(ours.logits[both].float(), theirs.logits[both].float(), atol=2e-3, rtol=1e-3)
        for index in by_mean[p].nonzero().flatten().tolist():
            masks, scores = smooth.text_candidates(encoding, [prompts[p]], index)
            best = masks[0, scores[0].argmax()].clamp_min(EMPTY_LOGIT)
            torch.testing.assert_close(ours.logits[index].float(), best, atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="score_smoothing must be an odd number of slices >= 1, got 2"):
        Medsam3Predictor(model, score_smoothing=2)


def test_text_prompts_share_the_empty_geometry_encoding(model) -> None:
    """Text prompts encode their (empty) geometry once per slice, not once per (prompt, slice) pair: the prompt
    tokens match upstream's per-pair encoding to float rounding (a different batch size, different GEMM blocking)."""
    from sam3.model.sam3_image import Sam3Image

    from scripts.network import empty_geometry, find_stage

    predictor = Medsam3Predictor(model)
    encoding = predictor.encode(random_slices(3))
    img_ids, text_ids = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    detector = predictor.model.detector
    with predictor._running():
        feats, pos = predictor._neck(encoding.trunk, tracker=False)
        text = predictor._encode_text(["liver", "spleen"])
        backbone_out = {"vision_features": feats[-1], "vision_pos_enc": pos, "backbone_fpn": feats, **text}
        ours = detector._encode_prompt(dict(backbone_out), find_stage(img_ids, text_ids), None)
        theirs = Sam3Image._encode_prompt(
            detector, dict(backbone_out), find_stage(img_ids, text_ids), empty_geometry(6, CPU)
        )
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[1], theirs[1])


def test_memory_selection_is_upstreams_by_default(model) -> None:
    """Propagation keeps only confident slices in memory, as upstream's video predictor (docs/clicks.md), from the
    predictor and from the bundle's inference config alike; training's tracker keeps every slice."""
    import json
    from pathlib import Path

    assert tiny_model().tracker.use_memory_selection is False
    assert Medsam3Predictor(tiny_model()).model.tracker.use_memory_selection is True
    assert Medsam3Predictor(tiny_model(), memory_selection=False).model.tracker.use_memory_selection is False
    # ``monai.bundle run --memory_selection false`` passes the string: it was read as True
    assert Medsam3Predictor(tiny_model(), memory_selection="false").model.tracker.use_memory_selection is False
    with pytest.raises(ValueError, match="memory_selection must be true or false, got 'sometimes'"):
        Medsam3Predictor(tiny_model(), memory_selection="sometimes")
    for empty in (0, -2):  # propagation would stop after the clicked slice
        with pytest.raises(ValueError, match=f"max_empty_slices must be at least 1 .*got {empty}"):
            Medsam3Predictor(tiny_model(), max_empty_slices=empty)
    config = json.loads((Path(__file__).parents[1] / "bundle" / "configs" / "inference.json").read_text())
    assert config["memory_selection"] is True


def test_presence_stride_answers_coarse_slices_then_only_where_a_label_showed(model) -> None:
    """With ``presence_stride`` 3 the coarse slices are answered as with every slice; between them a prompt is
    answered only next to a coarse slice that showed it (scripts/presence_pass.py), so absent labels cost less."""
    slices = random_slices(10)
    prompts = ["liver", "spleen", "aorta", "left kidney"]
    exact = Medsam3Predictor(model, batch_size=8, score_threshold=0.0)
    everywhere = exact.segment_text(exact.encode(slices), prompts)
    best = torch.stack([r.scores for r in everywhere])  # prompts x slices
    coarse = [0, 3, 6, 9]
    # A threshold that half of the prompts pass on some coarse slice: the others are skipped in between.
    threshold = float(best[:, coarse].amax(dim=1).median()) / PRESENCE_MARGIN
    plain = Medsam3Predictor(model, batch_size=8, score_threshold=threshold)
    strided = Medsam3Predictor(model, batch_size=8, score_threshold=threshold, presence_stride=3)
    expected, results = (p.segment_text(p.encode(slices), prompts) for p in (plain, strided))
    shown = (best[:, coarse] > PRESENCE_MARGIN * threshold).numpy()
    assert shown.any(axis=1).any() and not shown.any(axis=1).all()
    for p, (ours, theirs) in enumerate(zip(results, expected, strict=True)):
        torch.testing.assert_close(ours.scores[coarse], theirs.scores[coarse], atol=1e-5, rtol=1e-4)
        for low, high, i in ((0, 3, 0), (3, 6, 1), (6, 9, 2)):
            between = slice(low + 1, high)
            if shown[p, i] or shown[p, i + 1]:
                torch.testing.assert_close(
                    ours.logits[between].float(), theirs.logits[between].float(), atol=2e-3, rtol=1e-3
                )
            else:
                assert (ours.logits[between] == EMPTY_LOGIT).all() and (ours.scores[between] == 0).all()
    # With every label shown (threshold 0) the stride changes nothing: each pair lands on its own slice.
    all_shown = Medsam3Predictor(model, batch_size=8, score_threshold=0.0, presence_stride=3)
    for ours, theirs in zip(all_shown.segment_text(all_shown.encode(slices), prompts), everywhere, strict=True):
        torch.testing.assert_close(ours.logits.float(), theirs.logits.float(), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(ours.scores, theirs.scores, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="presence_stride must be >= 1"):
        Medsam3Predictor(model, presence_stride=0)
