"""Clicks that refine a text result by choosing among the detector's own instances for that text.

The detector answers a text prompt on each slice with a few candidate instances (its DETR queries), and the text
result keeps those scoring above the threshold. A click says which of them the user meant: on a clicked slice whose
result it contradicts, the candidate that holds the slice's foreground clicks and none of its background clicks (ties
go to the candidate overlapping the current result most, then to the higher score) joins the result when the result
holds no background click (the clicks only add), and replaces it otherwise. From there the choice is carried to the
neighbouring slices, each taking, among the candidates scoring at least ``min_relative_score`` times the clicked one,
the candidate that overlaps the previous slice's choice most, while that overlap (intersection over union) stays at
least ``min_overlap``: slices further away keep the text result. A slice whose result already agrees with its clicks
is left as it is.

Without a text prompt, :func:`structure_under_clicks` first finds which prompt's instance holds the foreground clicks
on the slice of the first one given, and :func:`build_from_clicks` follows that prompt's instances from there.

This serves models whose detector learnt the structures but whose tracker did not learn clicks (the demo model,
``docs/clicks.md``). Everything here works on low-resolution mask logits and is pure tensor geometry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = ["Candidates", "build_from_clicks", "follows_clicks", "refine_with_instances", "structure_under_clicks"]

Candidates = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # slice -> (Q x h x w logits, Q scores)


def refine_with_instances(
    logits: torch.Tensor,
    scores: torch.Tensor,
    candidates: Candidates,
    cells: np.ndarray,
    labels: np.ndarray,
    min_overlap: float = 0.5,
    min_relative_score: float = 0.75,
    min_score: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text result (``logits`` D x h x w, ``scores`` D) refined by clicks at low-resolution ``cells``
    (N x 3: slice, row, column) with ``labels`` (1 foreground, 0 background); returns new logits and scores.
    Instances scoring below ``min_score`` are never picked nor carried: a detector's unused queries hold some blob
    under almost any click, scoring near 0."""
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    if not 0.0 <= min_relative_score <= 1.0:
        raise ValueError(f"min_relative_score must be in [0, 1], got {min_relative_score}")
    logits, scores = logits.clone(), scores.clone()
    clicks = {int(index): _clicks_on(cells, labels, int(index)) for index in np.unique(cells[:, 0])}
    for index, (positive, negative) in clicks.items():
        current = logits[index] > 0
        if _agrees(current, positive, negative):
            continue  # the result already agrees with every click on this slice
        masks, instance_scores = candidates(index)
        eligible = instance_scores >= min_score
        chosen = _consistent_instance(masks > 0, instance_scores, eligible, current, positive, negative)
        if chosen is None:  # no instance fits: the slice keeps its result (the clicked voxels are set anyway)
            continue
        adds = bool(positive) and not any(bool(current[cell]) for cell in negative)  # nothing to take away
        floor = max(float(instance_scores[chosen]) * min_relative_score, min_score)
        _place(logits, scores, index, masks[chosen], instance_scores[chosen], adds)
        for step in (1, -1):
            _carry(logits, scores, candidates, index, step, masks[chosen] > 0, clicks, min_overlap, floor, adds)
    return logits, scores


def build_from_clicks(
    logits: torch.Tensor,
    scores: torch.Tensor,
    candidates: Candidates,
    cells: np.ndarray,
    labels: np.ndarray,
    min_score: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks without a text prompt, from an empty result (``logits``, ``scores``): the foreground clicks build it,
    then every click refines it as it refines a text result. So a background click no instance can honour leaves the
    structure (rule 1 clears its voxel) instead of emptying the slice it lies on."""
    foreground = labels == 1
    refine = functools.partial(refine_with_instances, candidates=candidates, min_score=min_score)
    logits, scores = refine(logits, scores, cells=cells[foreground], labels=labels[foreground])
    if foreground.all():
        return logits, scores  # nothing left to correct: a second pass would only ask the detector again
    return refine(logits, scores, cells=cells, labels=labels)


def follows_clicks(logits: torch.Tensor, cells: np.ndarray, labels: np.ndarray) -> bool:
    """Whether a result (``logits`` D x h x w) holds every foreground click's cell and no background click's: what
    a model that followed the clicks returns before the clicked voxels are set by rule."""
    return all(_agrees(logits[index] > 0, *_clicks_on(cells, labels, int(index))) for index in np.unique(cells[:, 0]))


def structure_under_clicks(
    prompts: Sequence[str],
    candidates: Callable[[Sequence[str], int], tuple[torch.Tensor, torch.Tensor]],
    cells: np.ndarray,
    labels: np.ndarray,
    chunk: int = 8,
    min_score: float = 0.0,
) -> str | None:
    """The prompt with an instance, on the slice of the first foreground click given, that holds the most of that
    slice's foreground clicks and none of its background clicks, the highest-scoring one among equals; None when no
    prompt has such an instance (instances scoring below ``min_score`` do not count). ``candidates`` answers
    ``chunk`` prompts at a time (P x Q x h x w, P x Q)."""
    index = int(cells[labels == 1][0, 0])
    positive, negative = _clicks_on(cells, labels, index)
    best: tuple[int, float, str] | None = None
    for start in range(0, len(prompts), chunk):
        names = prompts[start : start + chunk]
        for prompt, masks, scores in zip(names, *candidates(names, index), strict=True):
            nothing = torch.zeros_like(masks[0], dtype=torch.bool)
            chosen = _consistent_instance(masks > 0, scores, scores >= min_score, nothing, positive, negative)
            if chosen is None:
                continue
            key = (sum(bool(masks[chosen][cell] > 0) for cell in positive), float(scores[chosen]), prompt)
            if best is None or key[:2] > best[:2]:
                best = key
    return None if best is None else best[2]


Clicks = dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]]]]  # slice -> (foreground, background) cells


def _clicks_on(cells: np.ndarray, labels: np.ndarray, index: int) -> tuple[list, list]:
    on_slice = cells[:, 0] == index
    foreground = [tuple(int(v) for v in c) for c in cells[on_slice & (labels == 1), 1:]]
    return foreground, [tuple(int(v) for v in c) for c in cells[on_slice & (labels == 0), 1:]]


def _agrees(mask: torch.Tensor, positive: list, negative: list) -> bool:
    return all(bool(mask[cell]) for cell in positive) and not any(bool(mask[cell]) for cell in negative)


def _consistent_instance(
    masks: torch.Tensor,
    scores: torch.Tensor,
    eligible: torch.Tensor,
    current: torch.Tensor,
    positive: list[tuple[int, int]],
    negative: list[tuple[int, int]],
) -> int | None:
    """The ``eligible`` instance holding the most foreground clicks and no background click. With foreground clicks
    it must hold one; with background clicks only it must overlap the current result (nothing to correct otherwise)."""
    best: tuple[int, float, float, int] | None = None
    for q, mask in enumerate(masks):
        if not bool(eligible[q]):
            continue
        inside = sum(bool(mask[cell]) for cell in positive)
        overlap = float(_iou(mask, current))
        if (inside == 0 if positive else overlap == 0) or any(bool(mask[cell]) for cell in negative):
            continue
        key = (inside, overlap, float(scores[q]), q)
        if best is None or key[:3] > best[:3]:
            best = key
    return None if best is None else best[3]


def _carry(
    logits: torch.Tensor,
    scores: torch.Tensor,
    candidates: Candidates,
    start: int,
    step: int,
    chosen: torch.Tensor,
    clicks: Clicks,
    min_overlap: float,
    floor: float,
    adds: bool,
) -> None:
    """Follow the ``chosen`` instance from slice ``start`` in direction ``step`` while the instance overlapping it most
    among those scoring at least ``floor`` overlaps enough. It stops at a slice where it would hold a background
    click; where it misses a foreground click, that slice keeps its own result as well (as it does with ``adds``)."""
    previous = chosen
    index = start + step
    while 0 <= index < logits.shape[0]:
        masks, instance_scores = candidates(index)
        overlaps = _iou(masks > 0, previous).masked_fill(instance_scores < floor, -1.0)  # low scorers: never
        best = int(overlaps.argmax())
        carried = masks[best] > 0
        positive, negative = clicks.get(index, ([], []))
        if float(overlaps[best]) < min_overlap or any(bool(carried[cell]) for cell in negative):
            return
        keep = adds or not all(bool(carried[cell]) for cell in positive)
        _place(logits, scores, index, masks[best], instance_scores[best], keep)
        previous = carried
        index += step


def _place(
    logits: torch.Tensor, scores: torch.Tensor, index: int, mask: torch.Tensor, score: torch.Tensor, keep: bool
) -> None:
    """Slice ``index`` becomes the instance (``mask`` logits, ``score``), or with ``keep`` its union with the slice's
    result."""
    mask = _in_dtype(mask, logits)
    if keep:
        mask, score = torch.maximum(mask, logits[index]), torch.maximum(score.to(scores.dtype), scores[index])
    logits[index], scores[index] = mask, score


def _in_dtype(mask_logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask_logits`` in ``like``'s dtype, clamped so very negative logits stay finite in float16."""
    return mask_logits.clamp_min(torch.finfo(like.dtype).min).to(like.dtype)


def _iou(masks: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Intersection over union of ``other`` (h x w) with each of ``masks`` (... x h x w)."""
    union = (masks | other).sum(dim=(-2, -1))
    return (masks & other).sum(dim=(-2, -1)) / union.clamp_min(1)
