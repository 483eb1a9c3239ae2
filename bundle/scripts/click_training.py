"""Training the tracker's SAM heads (box and click prompts) with simulated interactive rounds, as SAM / SAM 2 do.

Text-prompt training never reaches the heads that answer boxes and clicks at inference. Here each (prompt, slice)
pair with a visible target gets a first prompt (a jittered box of the target, or one click at its deepest point),
then each later round adds one corrective click at the deepest point of the largest error of the previous round
(:func:`scripts.click_simulation.next_click`, the evaluation protocol) and feeds back the previous mask logits,
as :meth:`scripts.predictor.Medsam3Predictor.segment_clicks` does when a user refines a mask.

The features are those the predictor gives the tracker on a clicked slice (SAM 2 neck, ``conv_s0``/``conv_s1``,
no-memory embedding), so the first round reproduces inference exactly. Everything runs inside
:meth:`scripts.model_builder.MedSam3.forward`, so DistributedDataParallel sees the tracker's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from sam3.model.sam3_tracker_base import Sam3TrackerBase
from torch import nn

from .click_simulation import next_click
from .losses import low_res_targets

__all__ = ["ClickPromptLoss", "ClickSimulation", "corrective_points", "simulate_click_rounds"]

BOX_LABELS = (2, 3)  # SAM's point labels of a box's top-left and bottom-right corners


@dataclass(frozen=True)
class ClickSimulation:
    """How the interactive rounds are simulated.

    Args:
        rounds: prompting rounds per pair: the first prompt, then ``rounds - 1`` corrective clicks.
        box_probability: chance that a batch starts from boxes rather than single clicks (one choice per batch, so
            every pair of a round has the same number of points and one decoder call serves them all).
        box_jitter: standard deviation of the noise on each box coordinate, as a fraction of the box side
            (clipped at two deviations), so the heads learn from imprecise user boxes.
    """

    rounds: int = 3
    box_probability: float = 0.5
    box_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 (the first prompt), got {self.rounds}")
        if not 0.0 <= self.box_probability <= 1.0:
            raise ValueError(f"box_probability must be in [0, 1], got {self.box_probability}")
        if self.box_jitter < 0:
            raise ValueError(f"box_jitter must be >= 0, got {self.box_jitter}")


def simulate_click_rounds(
    tracker: Sam3TrackerBase,
    sam2_features: dict,
    targets: torch.Tensor,
    image_ids: torch.Tensor,
    simulation: ClickSimulation,
    generator: np.random.Generator | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run the interactive rounds of the tracker's SAM heads on every pair whose target is visible.

    Args:
        tracker: the model's tracker (its prompt encoder and mask decoder are what this trains).
        sam2_features: ``sam2_backbone_out`` of ``SAM3VLBackbone.forward_image`` on the B images: 3 levels
            (finest first) of ``backbone_fpn`` and ``vision_pos_enc``, B x C x h x w each.
        targets: N x S x S binary masks in model-input pixels, pair n on image ``image_ids[n]``.
        image_ids: N image indices into the B images.
        simulation: rounds and first-prompt settings.
        generator: draws the first prompt's kind and box jitter; ``None`` seeds one from torch's RNG, so runs
            are reproducible under ``torch.manual_seed``.

    Returns:
        One dict per round, rows in the order of ``pairs``: ``pairs`` (M pair indices), ``mask_logits``
        (M x K x h x w, every candidate mask; K = 3 for a single click, as SAM's multimask output, else 1),
        ``iou_predictions`` (M x K), ``object_score_logits`` (M x 1), ``best_mask_logits`` (M x 1 x h x w,
        the candidate with the highest predicted IoU: what the predictor returns and the next round refines),
        ``point_coords`` (M x P x 2, (x, y) in model-input pixels) and ``point_labels`` (M x P: 1 foreground,
        0 background, 2/3 box corners). Empty when no target is visible.
    """
    if targets.ndim != 3 or targets.shape[0] != len(image_ids):
        raise ValueError(f"Expected N x S x S click targets for {len(image_ids)} pairs, got {tuple(targets.shape)}")
    low = tracker.low_res_mask_size
    low_targets = low_res_targets(targets, low)
    pairs = low_targets.flatten(1).any(dim=1).nonzero().squeeze(-1)
    if pairs.numel() == 0:
        return []
    if generator is None:
        generator = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    features, high_res = _conditioning_features(tracker, sam2_features)
    images = image_ids.to(pairs.device)[pairs]
    features, high_res = features[images], [level[images] for level in high_res]
    pair_targets = low_targets[pairs]
    reference = pair_targets.bool().cpu().numpy()
    image_size = tracker.image_size
    if generator.random() < simulation.box_probability:
        coords, labels = _jittered_boxes(targets[pairs], simulation.box_jitter, generator)
    else:
        coords, labels = corrective_points(torch.full_like(pair_targets, -1.0), reference, image_size)
    coords, labels = coords.to(features.device), labels.to(features.device)

    rounds: list[dict[str, torch.Tensor]] = []
    previous = None
    for _ in range(simulation.rounds):
        if previous is not None:
            new_coords, new_labels = corrective_points(previous[:, 0], reference, image_size)
            coords = torch.cat([coords, new_coords.to(coords.device)], dim=1)
            labels = torch.cat([labels, new_labels.to(labels.device)], dim=1)
        point_inputs = {"point_coords": coords, "point_labels": labels}
        candidates, _, ious, best, _, _, object_scores = tracker._forward_sam_heads(
            backbone_features=features,
            point_inputs=point_inputs,
            mask_inputs=previous,
            high_res_features=high_res,
            multimask_output=tracker._use_multimask(True, point_inputs),
            gt_masks=pair_targets,  # read only in training: keeps the masks of present targets (teacher forcing)
        )
        rounds.append(
            {
                "pairs": pairs,
                "mask_logits": candidates,
                "iou_predictions": ious,
                "object_score_logits": object_scores,
                "best_mask_logits": best,
                "point_coords": coords,
                "point_labels": labels,
            }
        )
        # A user sees the mask, not its gradient: the next round's inputs are fixed, as at inference.
        previous = best.detach().float()
    return rounds


def _conditioning_features(tracker: Sam3TrackerBase, sam2_features: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tracker's view of a clicked slice with no memory yet, as in ``Medsam3Predictor._track_step``.

    Returns the B x C x f x f image embedding (plus ``no_mem_embed``, added by the tracker's own memory step) and
    the two high-resolution levels projected by the mask decoder's ``conv_s0`` / ``conv_s1``.
    """
    fpn, pos = sam2_features["backbone_fpn"], sam2_features["vision_pos_enc"]
    decoder = tracker.sam_mask_decoder
    high_res = [decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])]
    top = fpn[-1]
    features = tracker._prepare_memory_conditioned_features(
        frame_idx=0,
        is_init_cond_frame=True,
        current_vision_feats=[top.flatten(2).permute(2, 0, 1)],
        current_vision_pos_embeds=[pos[-1].flatten(2).permute(2, 0, 1)],
        feat_sizes=[tuple(top.shape[-2:])],
        output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
        num_frames=1,
    )
    return features, high_res


def corrective_points(
    mask_logits: torch.Tensor, reference: np.ndarray, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per pair at the deepest point of the largest error of ``mask_logits > 0`` against ``reference``.

    Args:
        mask_logits: M x h x w low-res logits (all negative for the first click: it goes to the target's centre).
        reference: M x h x w boolean targets on the same grid.
        image_size: side S of the model input.

    Returns:
        M x 1 x 2 float (x, y) model-input pixels of the low-res cell centre (the predictor maps a slice pixel
        the same way), and M x 1 int32 labels. A pair predicted perfectly gets a foreground click at its
        target's deepest point, so every pair of a round keeps the same number of points.
    """
    prediction = (mask_logits.detach() > 0).cpu().numpy()
    size = prediction.shape[-1]
    points, labels = [], []
    for predicted, target in zip(prediction, reference, strict=True):
        if not (predicted != target).any():
            predicted = np.zeros_like(target)
        point, label = _cropped_next_click(predicted, target)
        points.append(point)
        labels.append(label)
    rows_cols = np.asarray(points, dtype=np.float32)
    xy = (rows_cols[:, ::-1] + 0.5) * (image_size / size)
    return torch.from_numpy(xy.copy())[:, None], torch.tensor(labels, dtype=torch.int32)[:, None]


def _cropped_next_click(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, int]:
    """``next_click`` on the errors' bounding box plus one pixel: the same click, several times faster.

    The ring around the box is error-free (or the image border, which ``next_click`` treats alike), and no
    background pixel outside it is nearer to an error pixel than the ring, so regions and depths are unchanged.
    """
    error = prediction != reference
    rows, cols = np.flatnonzero(error.any(axis=1)), np.flatnonzero(error.any(axis=0))
    r0, c0 = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
    window = (slice(r0, rows[-1] + 2), slice(c0, cols[-1] + 2))
    point, label = next_click(prediction[window], reference[window], (1.0, 1.0))
    return point + (r0, c0), label


def _jittered_boxes(
    targets: torch.Tensor, jitter: float, generator: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """M x 2 x 2 box corners (x0, y0), (x1, y1) around each target's pixels, in model-input pixels, with noise."""
    masks = targets.detach().bool().cpu().numpy()
    size = masks.shape[-1]
    boxes = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        # Pixel edges: (c0, r0) is the top-left corner of the first pixel, (c1 + 1, r1 + 1) the far corner.
        box = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
        side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        noise = np.clip(generator.standard_normal(4), -2.0, 2.0) * jitter * side
        boxes.append(np.clip(box + noise, 0, size))
    corners = torch.as_tensor(np.asarray(boxes), dtype=torch.float32).view(-1, 2, 2)
    return corners, torch.tensor([BOX_LABELS] * len(boxes), dtype=torch.int32)


class ClickPromptLoss(nn.Module):
    """SAM's interactive loss over the rounds of :func:`simulate_click_rounds`, averaged over rounds.

    Per round: focal + Dice on the candidate mask that fits best (SAM backpropagates only the best of its
    multimask outputs, so the candidates can specialise), MSE between every candidate's predicted IoU and its
    actual IoU (thresholded at 0; the predictor picks the candidate by this prediction). The object score is not
    trained here: every simulated round shows a present structure, so it would only learn "always present", and
    propagation relies on it to stop where the structure ends.

    Args:
        focal_weight, dice_weight: weights inside MONAI's ``DiceFocalLoss`` (SAM 2 uses 20 : 1).
        iou_weight: weight of the IoU-prediction term.
    """

    def __init__(self, focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0) -> None:
        super().__init__()
        self.weights = {"click_mask": 1.0, "click_iou": iou_weight}
        self.dice_focal = DiceFocalLoss(
            sigmoid=True, reduction="none", gamma=2.0, lambda_dice=dice_weight, lambda_focal=focal_weight
        )

    def forward(self, outputs: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``outputs``: :meth:`MedSam3.forward`'s, with ``click_rounds``; ``targets``: the N x S x S click targets.

        Returns the weighted ``loss`` and the terms ``click_mask`` and ``click_iou``. Without any
        round (no visible target) all are zeros that keep the graph, so ``backward`` still works.
        """
        rounds = outputs["click_rounds"]
        if not rounds:
            zero = outputs["pred_masks"].float().mean() * 0.0
            return {"click_mask": zero, "click_iou": zero, "loss": zero}
        low = low_res_targets(targets, rounds[0]["mask_logits"].shape[-1])
        per_round = [self._round_terms(r, low[r["pairs"]]) for r in rounds]
        terms = {name: torch.stack([t[name] for t in per_round]).mean() for name in self.weights}
        terms["loss"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms

    def _round_terms(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = out["mask_logits"].float()  # M x K x h x w
        expanded = target[:, None].expand_as(logits)
        per_mask = self.dice_focal(logits, expanded).mean(dim=(2, 3))  # M x K (Dice is constant over pixels)
        with torch.no_grad():
            predicted = logits > 0
            inter = (predicted & expanded.bool()).flatten(2).sum(-1)
            union = (predicted | expanded.bool()).flatten(2).sum(-1)
            actual_iou = inter / union.clamp_min(1)
        return {
            "click_mask": per_mask.min(dim=1).values.mean(),
            "click_iou": F.mse_loss(out["iou_predictions"].float(), actual_iou),
        }
