"""The prompt contract: valid requests parse, every malformed one gets a message that says what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.prompts import PromptSet, parse_list_argument


def test_valid_prompts() -> None:
    texts = PromptSet.create(texts=["liver", " left kidney ", 3])
    assert texts.texts == ("liver", "left kidney", "3") and texts.ndim is None
    clicks = PromptSet.create(texts="liver", points=[[1, 2, 3], [4, 5, 6]], point_labels=[1, 0])
    assert clicks.points.tolist() == [[1, 2, 3], [4, 5, 6]] and clicks.point_labels.tolist() == [1, 0]
    assert PromptSet.create(points=[[1, 2, 3]]).point_labels.tolist() == [1]  # unlabelled clicks are foreground
    box = PromptSet.create(boxes=[1, 2, 3, 4, 5, 6])
    assert box.boxes.shape == (1, 6) and box.ndim == 3
    assert PromptSet.create(points=[[5, 6]]).ndim == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "No prompts given"),
        ({"texts": []}, "No prompts given"),
        ({"texts": ["  "]}, "Empty text prompt"),
        ({"texts": ["liver", "Liver"]}, "Duplicate text prompts"),
        ({"texts": [None]}, "Text prompts must be strings"),
        ({"points": [[1, 2, 3, 4]]}, "points must be a list of"),
        ({"points": [[1.5, 2, 3]]}, "points must be integer voxel indices"),
        ({"points": [["a", 2, 3]]}, "points must be numbers"),
        ({"points": [[np.nan, 2, 3]]}, "non-finite"),
        ({"points": [[1, 2, 3]], "point_labels": [1, 1]}, "one value per point"),
        ({"points": [[1, 2, 3]], "point_labels": [2]}, r"1 \(foreground\) or 0 \(background\)"),
        ({"points": [[1, 2, 3]], "point_labels": [0]}, "Background clicks alone"),
        ({"boxes": [[1, 2, 3]]}, "boxes must be a list of"),
        ({"points": [[1, 2]], "boxes": [[1, 2, 3, 4, 5, 6]]}, "same number of dimensions"),
        ({"texts": ["liver", "spleen"], "points": [[1, 2, 3]]}, "give at most one"),
    ],
)
def test_invalid_prompts(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptSet.create(**kwargs)


def test_background_clicks_refine_a_box_or_a_text_prompt() -> None:
    for kwargs in ({"boxes": [[1, 1, 1, 5, 5, 5]]}, {"texts": ["liver"]}):
        prompts = PromptSet.create(points=[[2, 2, 2]], point_labels=[0], **kwargs)
        assert prompts.point_labels.tolist() == [0]


def test_coordinates_checked_against_image() -> None:
    shape = (10, 20, 30)
    PromptSet.create(points=[[9, 19, 29]], boxes=[[0, 0, 0, 9, 19, 29]]).check_inside(shape)
    with pytest.raises(ValueError, match=r"Point \[10, 0, 0\] is outside the image \(shape \(10, 20, 30\)\)"):
        PromptSet.create(points=[[10, 0, 0]]).check_inside(shape)
    with pytest.raises(ValueError, match=r"Point \[-1, 0, 0\] is outside"):
        PromptSet.create(points=[[-1, 0, 0]]).check_inside(shape)
    with pytest.raises(ValueError, match="Box .* is outside the image"):
        PromptSet.create(boxes=[[0, 0, 0, 10, 5, 5]]).check_inside(shape)
    with pytest.raises(ValueError, match="start corner after its end corner"):
        PromptSet.create(boxes=[[5, 0, 0, 4, 5, 5]]).check_inside(shape)
    with pytest.raises(ValueError, match="Prompt coordinates have 2 dimensions but the image has 3"):
        PromptSet.create(points=[[1, 2]]).check_inside(shape)


def test_command_line_lists() -> None:
    assert parse_list_argument("['liver', 'left kidney']", "prompts") == ["liver", "left kidney"]
    assert parse_list_argument("liver", "prompts") == ["liver"]
    assert parse_list_argument("[[1, 2, 3]]", "points") == [[1, 2, 3]]
    assert parse_list_argument(["a"], "prompts") == ["a"]
    assert parse_list_argument(None, "points") is None and parse_list_argument("", "points") is None
    with pytest.raises(ValueError, match="--points is not a valid list"):
        parse_list_argument("[[1, 2", "points")
    assert parse_list_argument(3, "prompts") == [3]  # --prompts 3: the command line passes a bare number as is
    assert PromptSet.create(texts=parse_list_argument(3, "prompts")).texts == ("3",)
    with pytest.raises(ValueError, match="--points must be a list, got dict"):
        parse_list_argument({"a": 1}, "points")
