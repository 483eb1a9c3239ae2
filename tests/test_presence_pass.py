"""The coarse-then-neighbourhood plan of (slice, prompt) pairs for many-label text requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.presence_pass import PRESENCE_MARGIN, coarse_slices, neighbourhood_plan, plan_chunks, smoothed_scores


@pytest.mark.parametrize(
    ("num", "stride", "expected"), [(10, 4, [0, 4, 8, 9]), (9, 4, [0, 4, 8]), (5, 1, [0, 1, 2, 3, 4]), (1, 3, [0])]
)
def test_coarse_slices_leave_no_slice_further_than_the_stride(num: int, stride: int, expected: list[int]) -> None:
    assert coarse_slices(num, stride) == expected


def test_a_stride_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="presence_stride must be >= 1, got 0"):
        coarse_slices(10, 0)


def test_only_prompts_a_neighbouring_coarse_slice_showed_are_answered_between() -> None:
    coarse = [0, 4, 8, 9]
    threshold = 0.5
    shown, faint = 0.9, PRESENCE_MARGIN * threshold + 0.01
    scores = np.array(
        [
            [0.0, shown, 0.0, 0.0],  # prompt 0: on slice 4 -> slices 1-3 and 5-7
            [0.0, 0.0, 0.0, faint],  # prompt 1: faintly on slice 9 -> nothing between 8 and 9, nothing else
            [faint - 0.02, 0.0, 0.0, 0.0],  # prompt 2: below the margin everywhere -> never
        ]
    )
    plan = neighbourhood_plan(coarse, scores, threshold, 10)
    assert plan == [(1, [0]), (2, [0]), (3, [0]), (5, [0]), (6, [0]), (7, [0])]
    scores[1, 0] = shown
    assert neighbourhood_plan(coarse, scores, threshold, 10)[:3] == [(1, [0, 1]), (2, [0, 1]), (3, [0, 1])]
    assert neighbourhood_plan(list(range(10)), np.ones((3, 10)), threshold, 10) == []  # stride 1: nothing left


def test_chunks_cap_the_pairs_per_forward_but_keep_whole_slices() -> None:
    plan = [(0, [0, 1, 2]), (1, [0]), (2, [0, 1]), (3, [0, 1, 2, 3, 4])]
    assert plan_chunks(plan, 4) == [[(0, [0, 1, 2]), (1, [0])], [(2, [0, 1])], [(3, [0, 1, 2, 3, 4])]]
    assert plan_chunks([], 4) == []


def test_smoothed_scores_are_the_mean_over_neighbouring_slices_with_the_ends_repeated() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.9, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1], [0.2] * 9])
    inside, outside = (0.9 + 0.9 + 0.1) / 3, (0.9 + 0.1 + 0.1) / 3
    expected = torch.tensor([[inside] * 4 + [outside] * 4 + [0.1], [0.2] * 9])
    torch.testing.assert_close(smoothed_scores(scores, 3), expected)
    five = smoothed_scores(scores, 5)[0]
    torch.testing.assert_close(five[[0, 4, 8]], torch.tensor([0.74, 0.58, 0.26]))  # (.9 + .9 + .9 + .1 + .9) / 5, ...
    assert smoothed_scores(scores, 1) is scores  # 1: each slice's own score
    for window in (0, 2, -1):
        with pytest.raises(ValueError, match=f"score_smoothing must be an odd number of slices >= 1, got {window}"):
            smoothed_scores(scores, window)
