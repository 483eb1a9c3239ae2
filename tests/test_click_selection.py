"""Clicks choosing among the detector's instances (``click_refinement: instances``), and the low-resolution grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.click_selection import build_from_clicks, follows_clicks, refine_with_instances, structure_under_clicks
from scripts.low_res_grid import pixel_cells

D, LOW = 7, 16
ON, OFF = 8.0, -8.0


def _square(top: int, left: int, side: int) -> torch.Tensor:
    logits = torch.full((LOW, LOW), OFF)
    logits[top : top + side, left : left + side] = ON
    return logits


class Instances:
    """Two instances per slice: a left square (score 0.4) on slices 1-5, drifting one cell per slice, and a right
    square (score 0.9) on every slice; slice 6's left square has moved too far to overlap slice 5's."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.asked.append(index)
        left = _square(2, index, 5) if 1 <= index <= 5 else _square(12, 0, 3)
        return torch.stack([left, _square(2, 10, 5)]), torch.tensor([0.4, 0.9])


def _text_result() -> tuple[torch.Tensor, torch.Tensor]:
    """A text result that kept only the right square, on every slice."""
    return torch.stack([_square(2, 10, 5)] * D), torch.full((D,), 0.9)


def test_a_foreground_click_adds_the_instance_under_it_and_follows_it_while_it_overlaps() -> None:
    """The click asks for more, so the text result stays and the clicked instance joins it, carried slice by slice."""
    logits, scores = _text_result()
    cells = np.array([[3, 4, 5]])  # slice 3, inside the left square (columns 3-7)
    new, new_scores = refine_with_instances(logits, scores, Instances(), cells, np.array([1]))
    for index in range(1, 6):
        both = torch.maximum(_square(2, index, 5), _square(2, 10, 5))
        assert torch.equal(new[index] > 0, both > 0), index
        assert new_scores[index] == pytest.approx(0.9)
    # slice 0 has no left square and slice 6's does not overlap slice 5's: both keep the text result
    for index in (0, 6):
        assert torch.equal(new[index], logits[index]) and new_scores[index] == pytest.approx(0.9)
    assert torch.equal(logits, _text_result()[0])  # the input is left alone


class FadingInstances(Instances):
    """As :class:`Instances`, but the left square scores 0.2 from slice 5 on: half the clicked instance's 0.4."""

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        masks, scores = super().__call__(index)
        return masks, torch.tensor([0.2 if index >= 5 else 0.4, 0.9])


def test_the_carried_instance_stops_where_the_detector_no_longer_believes_in_it() -> None:
    """A continuation scoring below ``min_relative_score`` times the clicked instance is not carried (an unsure
    detector's blob would spread past the structure's end); 0 carries whatever overlaps."""
    empty, cells, labels = torch.full((D, LOW, LOW), OFF), np.array([[3, 4, 5]]), np.array([1])
    new, _ = refine_with_instances(empty, torch.zeros(D), FadingInstances(), cells, labels)
    assert [index for index in range(D) if (new[index] > 0).any()] == [1, 2, 3, 4]
    new, _ = refine_with_instances(empty, torch.zeros(D), FadingInstances(), cells, labels, min_relative_score=0.0)
    assert [index for index in range(D) if (new[index] > 0).any()] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="min_relative_score"):
        refine_with_instances(empty, torch.zeros(D), Instances(), cells, labels, min_relative_score=1.5)


class BlobInstances(Instances):
    """As :class:`Instances`, plus a near-zero blob (score 0.001) covering the whole slice on every slice: what a
    detector's unused queries hold under almost any click."""

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        masks, scores = super().__call__(index)
        return torch.cat([masks, torch.full((1, LOW, LOW), ON)]), torch.cat([scores, torch.tensor([0.001])])


def test_instances_scoring_below_the_least_score_are_never_picked_nor_carried() -> None:
    """A click outside every real instance finds only the blob: with ``min_score`` the slice keeps its result
    (the clicked voxel is set downstream, rule 1) instead of the blob spreading over every slice; the clicks-alone
    look-up does not name a structure by its blob either."""
    logits, scores = _text_result()
    cells, labels = np.array([[3, 14, 0]]), np.array([1])  # slice 3, in neither square
    picked, _ = refine_with_instances(logits, scores, BlobInstances(), cells, labels)
    assert all((picked[index] > 0).all() for index in range(D))  # without a least score, the blob everywhere
    kept, _ = refine_with_instances(logits, scores, BlobInstances(), cells, labels, min_score=0.25)
    assert torch.equal(kept, logits)
    # a real instance is still picked, and carried only while its continuation is no blob
    kept, _ = refine_with_instances(logits, scores, BlobInstances(), np.array([[3, 4, 5]]), labels, min_score=0.25)
    assert [index for index in range(D) if (kept[index, :, :10] > 0).any()] == [1, 2, 3, 4, 5]
    assert (kept[:, 13:, :] <= 0).all()

    def lookup(names: list[str], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        masks, instance_scores = BlobInstances()(index)
        return masks[None].expand(len(names), -1, -1, -1), instance_scores[None].expand(len(names), -1)

    assert structure_under_clicks(["liver"], lookup, cells, labels) == "liver"
    assert structure_under_clicks(["liver"], lookup, cells, labels, min_score=0.25) is None


def test_clicks_alone_build_the_structure_before_a_background_click_no_instance_honours() -> None:
    """From nothing, a background click beside the foreground one inside the same instance: no instance holds the one
    without the other, so one pass would leave every slice empty; the foreground clicks build first, and the
    background click leaves the structure as it was (its voxel is cleared by rule 1, downstream)."""
    empty, cells, labels = torch.full((D, LOW, LOW), OFF), np.array([[3, 4, 5], [3, 5, 6]]), np.array([1, 0])
    one_pass, _ = refine_with_instances(empty, torch.zeros(D), Instances(), cells, labels)
    assert not (one_pass > 0).any()
    built, _ = build_from_clicks(empty, torch.zeros(D), Instances(), cells, labels)
    assert [index for index in range(D) if (built[index] > 0).any()] == [1, 2, 3, 4, 5]
    assert torch.equal(built[3] > 0, _square(2, 3, 5) > 0)


def test_foreground_clicks_alone_build_in_one_pass() -> None:
    """Without background clicks there is nothing to correct: one pass, each slice asked once, even where a click no
    instance holds leaves its slice disagreeing (here the second click, outside both squares)."""
    empty, cells, labels = torch.full((D, LOW, LOW), OFF), np.array([[3, 4, 5], [3, 14, 14]]), np.array([1, 1])
    asked = Instances()
    built, _ = build_from_clicks(empty, torch.zeros(D), asked, cells, labels)
    once, _ = refine_with_instances(empty, torch.zeros(D), Instances(), cells, labels)
    assert torch.equal(built, once) and len(asked.asked) == len(set(asked.asked))


def test_the_carried_instance_stops_below_the_overlap_asked_for() -> None:
    logits, scores = _text_result()
    # one cell of drift per slice on a side of 5: IoU 4/6 = 0.67, so 0.7 keeps only the clicked slice
    new, _ = refine_with_instances(logits, scores, Instances(), np.array([[3, 4, 5]]), np.array([1]), min_overlap=0.7)
    changed = [index for index in range(D) if not torch.equal(new[index], logits[index])]
    assert changed == [3]
    with pytest.raises(ValueError, match="min_overlap"):
        refine_with_instances(logits, scores, Instances(), np.array([[3, 4, 5]]), np.array([1]), min_overlap=0.0)


def test_the_carried_instance_passes_a_clicked_slice_only_when_it_agrees_with_its_clicks() -> None:
    empty = torch.full((D, LOW, LOW), OFF)
    far = np.array([[2, 4, 4], [4, 14, 14]])  # foreground on slice 2's left square, background far from slice 4's
    new, _ = refine_with_instances(empty, torch.zeros(D), Instances(), far, np.array([1, 0]))
    assert [index for index in range(D) if (new[index] > 0).any()] == [1, 2, 3, 4, 5]
    inside = np.array([[2, 4, 4], [4, 4, 6]])  # the background click inside slice 4's left square (columns 4-8)
    new, _ = refine_with_instances(empty, torch.zeros(D), Instances(), inside, np.array([1, 0]))
    assert [index for index in range(D) if (new[index] > 0).any()] == [1, 2, 3]


def test_a_background_click_drops_the_instance_under_it_for_one_that_overlaps_the_result() -> None:
    both = torch.maximum(_square(2, 3, 5), _square(2, 10, 5))
    logits, scores = torch.stack([both] * D), torch.full((D,), 0.9)
    new, _ = refine_with_instances(logits, scores, Instances(), np.array([[3, 4, 11]]), np.array([0]))
    assert torch.equal(new[3] > 0, _square(2, 3, 5) > 0)  # the right square held the click: the left one stays


def test_clicks_no_instance_agrees_with_leave_the_slice_as_it_was() -> None:
    logits, scores = _text_result()
    instances = Instances()
    # a foreground and a background click inside the same square: no instance holds one without the other
    cells, labels = np.array([[3, 4, 11], [3, 5, 12]]), np.array([1, 0])
    new, _ = refine_with_instances(logits, scores, instances, cells, labels)
    assert torch.equal(new, logits) and instances.asked == [3]
    # a background click where the result is empty: nothing to correct
    empty = torch.full((D, LOW, LOW), OFF)
    new, _ = refine_with_instances(empty, torch.zeros(D), Instances(), np.array([[3, 14, 1]]), np.array([0]))
    assert torch.equal(new, empty)


def test_clicks_the_result_already_agrees_with_change_nothing() -> None:
    logits, scores = _text_result()
    instances = Instances()
    # a foreground click inside the right square and a background click outside it, both on slice 3
    cells, labels = np.array([[3, 4, 11], [3, 14, 1]]), np.array([1, 0])
    new, new_scores = refine_with_instances(logits, scores, instances, cells, labels)
    assert torch.equal(new, logits) and torch.equal(new_scores, scores) and instances.asked == []


def test_a_result_follows_clicks_when_it_holds_every_foreground_and_no_background_click() -> None:
    logits, _ = _text_result()  # the right square (rows 2-6, columns 10-14) on every slice
    inside, outside = [3, 4, 11], [3, 14, 1]
    assert follows_clicks(logits, np.array([inside, outside]), np.array([1, 0]))
    assert follows_clicks(logits, np.array([inside, [5, 3, 12]]), np.array([1, 1]))  # clicks on two slices
    assert not follows_clicks(logits, np.array([inside, [5, 14, 1]]), np.array([1, 1]))  # one slice's click missed
    assert not follows_clicks(logits, np.array([inside, [3, 4, 12]]), np.array([1, 0]))  # a background click inside


def test_the_structure_under_unnamed_clicks_is_the_best_scoring_prompt_holding_them() -> None:
    asked: list[list[str]] = []

    def candidates(prompts: list[str], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert index == 3  # the first foreground click's slice
        asked.append(list(prompts))
        squares = {"liver": _square(2, 3, 5), "spleen": _square(2, 10, 5), "aorta": _square(2, 3, 5)}
        scores = {"liver": 0.6, "spleen": 0.9, "aorta": 0.3}
        return torch.stack([squares[p][None] for p in prompts]), torch.tensor([[scores[p]] for p in prompts])

    prompts = ["aorta", "liver", "spleen"]
    assert structure_under_clicks(prompts, candidates, np.array([[3, 4, 5]]), np.array([1]), chunk=2) == "liver"
    assert asked == [["aorta", "liver"], ["spleen"]]  # two prompts per detector pass
    assert structure_under_clicks(prompts, candidates, np.array([[3, 4, 11]]), np.array([1])) == "spleen"
    assert structure_under_clicks(prompts, candidates, np.array([[3, 14, 1]]), np.array([1])) is None
    # a background click on the liver's square rules out both prompts whose instance holds it
    cells, labels = np.array([[3, 4, 5], [3, 3, 4]]), np.array([1, 0])
    assert structure_under_clicks(prompts, candidates, cells, labels) is None


def test_pixels_map_to_the_cells_their_centres_fall_in() -> None:
    points = np.array([[2, 0, 0], [2, 63, 31], [0, 31, 15], [1, 32, 16]])
    cells = pixel_cells(points, height=64, width=32, low=16)
    assert cells.tolist() == [[2, 0, 0], [2, 15, 15], [0, 7, 7], [1, 8, 8]]
