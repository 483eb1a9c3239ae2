"""Training losses for text prompts: presence, query classification with matching, and mask focal + Dice.

One (slice, prompt) pair is one detector query set. A structure on a slice is one target (organs are single
objects; the union mask is its target), so matching is the one-to-one case of Hungarian matching: the query
whose mask and score fit the target best is the positive, every other query is a negative. Prompts of
structures absent from the slice teach the presence score to say "not here".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from torch import nn

__all__ = ["TextPromptLoss", "low_res_targets"]

PAIR_OUTPUTS = ("pred_logits", "pred_masks", "presence_logit_dec", "semantic_seg")  # indexed by (slice, prompt) pair


class TextPromptLoss(nn.Module):
    """Loss of one detector forward over N (slice, prompt) pairs.

    Args:
        mask_weight, class_weight, presence_weight, semantic_weight: term weights.
    """

    def __init__(
        self,
        mask_weight: float = 5.0,
        class_weight: float = 2.0,
        presence_weight: float = 1.0,
        semantic_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = {"mask": mask_weight, "class": class_weight, "presence": presence_weight}
        self.weights["semantic"] = semantic_weight
        self.dice_focal = DiceFocalLoss(sigmoid=True, reduction="mean", gamma=2.0)

    def forward(
        self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, valid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``outputs``: the detector's (``pred_logits`` N x Q x 1, ``pred_masks`` N x Q x h x w,
        ``presence_logit_dec`` N x 1, ``semantic_seg`` N x 1 x h x w); ``targets``: N x H x W binary masks;
        ``valid``: N flags, False for pairs whose label the sample does not annotate (left out of every term).

        Returns the weighted ``loss`` and each term.
        """
        if valid is not None:
            keep = valid.bool()
            if not keep.any():
                zero = outputs["pred_masks"].sum() * 0.0  # keeps the graph
                return {name: zero for name in (*self.weights, "loss")}
            outputs = {key: outputs[key][keep] for key in PAIR_OUTPUTS if outputs.get(key) is not None}
            targets = targets[keep]
        masks = outputs["pred_masks"].float()
        target = low_res_targets(targets, masks.shape[-1])
        present = target.flatten(1).any(dim=1)
        logits = outputs["pred_logits"].float().squeeze(-1)  # N x Q, presence already folded in

        terms = {
            "presence": F.binary_cross_entropy_with_logits(
                outputs["presence_logit_dec"].float().squeeze(-1), present.float()
            )
        }
        matched = self._match(masks, logits, target)
        class_target = torch.zeros_like(logits)
        rows = present.nonzero().squeeze(-1)
        class_target[rows, matched[rows]] = 1.0
        terms["class"] = F.binary_cross_entropy_with_logits(logits, class_target)
        if rows.numel():
            chosen = masks[rows, matched[rows]][:, None]
            terms["mask"] = self.dice_focal(chosen, target[rows][:, None])
        else:
            terms["mask"] = masks.sum() * 0.0  # keeps the graph when no structure is on these slices
        semantic = outputs.get("semantic_seg")
        terms["semantic"] = (
            self.dice_focal(semantic.float(), target[:, None]) if semantic is not None else masks.sum() * 0
        )
        terms["loss"] = sum(self.weights[name] * value for name, value in terms.items())
        return terms

    @staticmethod
    @torch.no_grad()
    def _match(masks: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per pair, the query with the lowest cost (mask Dice cost + classification cost): N indices."""
        probs = masks.sigmoid().flatten(2)  # N x Q x hw
        flat = target.flatten(1)[:, None]  # N x 1 x hw
        dice = 1 - (2 * (probs * flat).sum(-1) + 1) / (probs.sum(-1) + flat.sum(-1) + 1)
        cost = dice - logits.sigmoid()
        return cost.argmin(dim=1)


def low_res_targets(targets: torch.Tensor, size: int) -> torch.Tensor:
    """N x S x S binary masks -> N x size x size floats in {0, 1} (area average >= 0.5), the logits' grid."""
    low = F.interpolate(targets[:, None].float(), size=(size, size), mode="area")[:, 0]
    return (low >= 0.5).float()
