"""What a predictor hands out: a slice stack's encoding (reused by every prompt on it) and one prompt's result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["PromptResult", "VolumeEncoding"]


@dataclass
class VolumeEncoding:
    """Image features of a slice stack: ``trunk`` is D x C x f x f (ViT output), slices are H x W pixels."""

    trunk: torch.Tensor
    height: int
    width: int
    # Text results already computed on these features, by (prompt, score threshold, score smoothing): clicks that
    # refine a text result, and repeated requests for the same structure, reuse them.
    text_results: dict[tuple[str, float, int], PromptResult] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        return int(self.trunk.shape[0])

    def nbytes(self) -> int:
        held = [self.trunk] + [t for r in self.text_results.values() for t in (r.logits, r.scores)]
        return sum(t.numel() * t.element_size() for t in held)


@dataclass
class PromptResult:
    """One prompt's answer: ``logits`` D x h x w low-res mask logits (model space), ``scores`` D per-slice scores."""

    logits: torch.Tensor
    scores: torch.Tensor

    @property
    def score(self) -> float:
        """The prompt's score over the stack: its best slice."""
        return float(self.scores.max()) if self.scores.numel() else 0.0
