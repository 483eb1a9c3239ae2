"""Which (slice, prompt) pairs a many-label text request runs: every slice, or a coarse pass then its neighbourhood.

With ``presence_stride`` k > 1 every label is first answered on every k-th slice (and the last). A label is then
answered on the slices between two coarse slices only when one of the two showed it: an instance scoring above
:data:`PRESENCE_MARGIN` times the score threshold (half of it, so a structure's faint edge still opens its
neighbourhood). Labels absent from the image cost 1/k of the full pass. The price: a structure shorter than k
slices, lying wholly between two coarse slices, can be missed; k = 1 (the default) answers every pair, exactly.

Once every pair is answered, ``score_smoothing`` w > 1 decides which slices show a label from the mean of its
score over w consecutive slices (:func:`smoothed_scores`) instead of each slice's own: an organ is one run of
slices, so a slice inside it that scores low keeps its best instance, and a lone confident slice outside it is
dropped. Slices that pass both ways keep their masks unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PRESENCE_MARGIN",
    "Plan",
    "check_smoothing",
    "coarse_slices",
    "neighbourhood_plan",
    "plan_chunks",
    "smoothed_scores",
]

PRESENCE_MARGIN = 0.5

Plan = list[tuple[int, list[int]]]  # (slice, the prompt indices answered on it), slices ascending


def coarse_slices(num_slices: int, stride: int) -> list[int]:
    """Every ``stride``-th slice and the last one: no slice is more than ``stride - 1`` from a coarse slice."""
    if stride < 1:
        raise ValueError(f"presence_stride must be >= 1, got {stride}")
    return sorted(set(range(0, num_slices, stride)) | {num_slices - 1})


def neighbourhood_plan(coarse: list[int], scores: np.ndarray, threshold: float, num_slices: int) -> Plan:
    """The other slices, each with the prompts that either neighbouring coarse slice showed.

    ``scores`` is P x len(coarse): each prompt's best instance score on each coarse slice.
    """
    shown = np.asarray(scores) > PRESENCE_MARGIN * threshold
    plan: Plan = []
    for i, (low, high) in enumerate(zip(coarse[:-1], coarse[1:], strict=True)):
        prompts = np.flatnonzero(shown[:, i] | shown[:, i + 1]).tolist()
        if prompts:
            plan += [(index, prompts) for index in range(low + 1, high)]
    return plan


def plan_chunks(plan: Plan, pairs_per_forward: int) -> list[Plan]:
    """Consecutive slices of ``plan`` grouped so a forward holds at most ``pairs_per_forward`` (slice, prompt)
    pairs, and at least one slice whatever its number of prompts."""
    chunks: list[Plan] = []
    size = 0
    for entry in plan:
        if not chunks or size + len(entry[1]) > pairs_per_forward:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += len(entry[1])
    return chunks


def check_smoothing(window: int) -> None:
    if window < 1 or window % 2 == 0:
        raise ValueError(f"score_smoothing must be an odd number of slices >= 1, got {window}")


def smoothed_scores(scores: torch.Tensor, window: int) -> torch.Tensor:
    """P x D per-slice scores averaged over ``window`` slices centred on each (the end slices repeated beyond the
    stack, so a structure touching the first or last slice is not diluted); ``window`` 1 returns ``scores``."""
    check_smoothing(window)
    if window == 1:
        return scores
    padded = F.pad(scores[:, None].float(), (window // 2, window // 2), mode="replicate")
    return F.avg_pool1d(padded, window, stride=1)[:, 0].to(scores.dtype)
