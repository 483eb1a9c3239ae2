"""Training the tracker as SAM 2 trains on video: slice clips prompted on one or two slices, then propagated.

Text-prompt training never reaches the heads that answer boxes and clicks, nor the memory that carries a mask to the
next slice. Here every (prompt, clip) pair whose structure shows on the clip's first slice is tracked through the
clip (``K`` consecutive slices in either direction, so both propagation directions are trained):

1. The first slice gets a first prompt (a click at the structure's deepest point, a jittered box, or a click with
   the detector's text result as the previous mask, as when a user refines a text result), then ``rounds - 1``
   corrective clicks at the deepest point of the largest error (:func:`scripts.clicks.next_click`), each round
   feeding back the previous mask. Sometimes the last slice is prompted the same way too (two conditioning slices).
2. The other slices are predicted from the tracker's memory (memory attention over the encoded masks and object
   pointers of the prompted and previous slices), their masks encoded into memory in turn.
3. Every slice gets a mask loss (focal + Dice on the best candidate, where the structure shows), an IoU-prediction
   loss and an object-score loss, so slices where the structure is absent teach propagation to stop.

The features are those the predictor gives the tracker (SAM 2 neck, ``conv_s0``/``conv_s1``), so a prompted slice's
first round reproduces inference exactly. Everything runs inside :meth:`scripts.network.MedSam3.forward`, so
DistributedDataParallel sees the tracker's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from sam3.model.sam3_tracker_base import Sam3TrackerBase
from torch import nn

from .clicks import next_click
from .losses import low_res_targets

__all__ = ["ClickPromptLoss", "ClickSimulation", "corrective_points", "simulate_tracking"]

BOX_LABELS = (2, 3)  # SAM's point labels of a box's top-left and bottom-right corners


@dataclass(frozen=True)
class ClickSimulation:
    """How the interactive sessions are simulated.

    Args:
        rounds: prompting rounds on a prompted slice: the first prompt, then ``rounds - 1`` corrective clicks.
        box_probability: chance that a step's first prompts are boxes (one choice per step, so one decoder call
            serves every pair of a round).
        text_probability: chance that they are clicks on top of the detector's text result (the previous mask).
        second_prompt_probability: chance that the clip's last slice is prompted too, when every tracked pair shows
            there (two conditioning slices, as when a user corrects a slice far from the first).
        box_jitter: standard deviation of the noise on each box coordinate, as a fraction of the box side (clipped at
            two deviations), so the heads learn from imprecise user boxes.
    """

    rounds: int = 3
    box_probability: float = 0.25
    text_probability: float = 0.25
    second_prompt_probability: float = 0.3
    box_jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1 (the first prompt), got {self.rounds}")
        for name in ("box_probability", "text_probability", "second_prompt_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.box_probability + self.text_probability > 1.0:
            raise ValueError("box_probability + text_probability must be at most 1")
        if self.box_jitter < 0:
            raise ValueError(f"box_jitter must be >= 0, got {self.box_jitter}")


def simulate_tracking(
    tracker: Sam3TrackerBase,
    sam2_features: dict,
    targets: torch.Tensor,
    clip: int,
    simulation: ClickSimulation,
    generator: np.random.Generator | None = None,
    text_masks: torch.Tensor | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Track every pair whose target shows on its clip's first slice through the clip; one record per prediction.

    Args:
        tracker: the model's tracker (prompt encoder, mask decoder, memory attention and memory encoder train here).
        sam2_features: ``sam2_backbone_out`` of ``SAM3VLBackbone.forward_image`` on the images: 3 levels (finest
            first) of ``backbone_fpn`` and ``vision_pos_enc``. Image ``b * clip + t`` is slice t of clip b.
        targets: N x S x S binary masks in model-input pixels, query order: pair n = p * num_images + image.
        clip: slices per clip.
        simulation: prompting settings.
        generator: draws the prompt kinds and box jitter; ``None`` seeds one from torch's RNG (reproducible under
            ``torch.manual_seed``).
        text_masks: N x h x w detached low-res logits of the detector's text result per pair (for text-first prompts).

    Returns:
        Records in processing order (the prompted slices' rounds, then the other slices in order), each with
        ``pairs`` (M query indices of the slice predicted, into ``targets``), ``frame``, ``mask_logits`` (M x K x h x
        w candidates), ``iou_predictions`` (M x K), ``object_score_logits`` (M x 1), ``best_mask_logits`` (M x 1 x h
        x w, what the predictor returns), and for prompted rounds ``point_coords`` (M x P x 2, (x, y) model-input
        pixels) and ``point_labels`` (M x P: 1 foreground, 0 background, 2/3 box corners). Empty without a pair.
    """
    num_images = int(sam2_features["backbone_fpn"][-1].shape[0])
    if targets.ndim != 3 or clip < 1 or num_images % clip or targets.shape[0] % num_images:
        raise ValueError(
            f"Expected N x S x S targets for clips of {clip} among {num_images} images, got {tuple(targets.shape)}"
        )
    low = low_res_targets(targets, tracker.low_res_mask_size)
    present = low.flatten(1).any(dim=1)
    first = torch.arange(0, targets.shape[0], clip, device=targets.device)  # frame 0 of every (prompt, clip) pair
    tracked = first[present[first]]
    if tracked.numel() == 0:
        return []
    if generator is None:
        generator = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
    frames = _FrameFeatures(tracker, sam2_features, tracked % num_images)
    memory: dict[str, dict[int, dict]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    prompted = [0]
    if (
        clip > 1
        and bool(present[tracked + clip - 1].all())
        and generator.random() < simulation.second_prompt_probability
    ):
        prompted.append(clip - 1)
    kind = generator.random()
    records: list[dict[str, torch.Tensor]] = []
    for frame in prompted:
        pairs = tracked + frame
        first_kind = "box" if kind < simulation.box_probability else "click"
        prior = None
        if frame == 0 and text_masks is not None and kind >= 1.0 - simulation.text_probability:
            prior = text_masks[pairs][:, None].detach().float()
        rounds, out = _prompted_rounds(
            tracker, frames, frame, clip, pairs, targets, low, first_kind, prior, simulation, generator, memory
        )
        records += rounds
        memory["cond_frame_outputs"][frame] = out
    for frame in range(1, clip):
        if frame in prompted:
            continue
        record, out = _tracked_slice(tracker, frames, frame, clip, tracked + frame, low, memory)
        records.append(record)
        memory["non_cond_frame_outputs"][frame] = out
    return records


class _FrameFeatures:
    """The tracker's inputs on slice t of every tracked pair's clip: top-level features, positions, high-res maps."""

    def __init__(self, tracker: Sam3TrackerBase, sam2_features: dict, first_images: torch.Tensor) -> None:
        self.tracker = tracker
        fpn, pos = sam2_features["backbone_fpn"], sam2_features["vision_pos_enc"]
        decoder = tracker.sam_mask_decoder
        self.high_res = [decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])]
        self.top, self.top_pos = fpn[-1], pos[-1]
        self.first_images = first_images.to(self.top.device)
        self.size = tuple(self.top.shape[-2:])

    def at(
        self, frame: int, clip: int, memory: dict, prompted: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Slice ``frame``'s top-level features (HW x M x C), the same fused with the tracker's ``memory`` (M x C x
        h x w; a prompted slice gets the no-memory embedding instead) and the two high-resolution levels."""
        images = self.first_images + frame
        feats = [self.top[images].flatten(2).permute(2, 0, 1)]  # HW x M x C, as the tracker expects
        conditioned = self.tracker._prepare_memory_conditioned_features(
            frame_idx=frame,
            is_init_cond_frame=prompted,
            current_vision_feats=feats,
            current_vision_pos_embeds=[self.top_pos[images].flatten(2).permute(2, 0, 1)],
            feat_sizes=[self.size],
            output_dict=memory,
            num_frames=clip,
        )
        return feats, conditioned, [level[images] for level in self.high_res]


def _prompted_rounds(
    tracker: Sam3TrackerBase,
    frames: _FrameFeatures,
    frame: int,
    clip: int,
    pairs: torch.Tensor,
    targets: torch.Tensor,
    low: torch.Tensor,
    first_kind: str,
    prior: torch.Tensor | None,
    simulation: ClickSimulation,
    generator: np.random.Generator,
    memory: dict,
) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """The interactive rounds on a prompted slice, and the slice's memory entry from the last round."""
    feats, features, high_res = frames.at(frame, clip, memory, prompted=True)
    target = low[pairs]
    reference = target.bool().cpu().numpy()
    size = tracker.image_size
    if first_kind == "box":
        coords, labels = _jittered_boxes(targets[pairs], simulation.box_jitter, generator)
    else:
        coords, labels = corrective_points(torch.full_like(target, -1.0), reference, size)
    coords, labels = coords.to(features.device), labels.to(features.device)
    records, previous, outputs = [], prior, None
    for round_index in range(simulation.rounds):
        if round_index:
            new_coords, new_labels = corrective_points(previous[:, 0], reference, size)
            coords = torch.cat([coords, new_coords.to(coords.device)], dim=1)
            labels = torch.cat([labels, new_labels.to(labels.device)], dim=1)
        point_inputs = {"point_coords": coords, "point_labels": labels}
        outputs = tracker._forward_sam_heads(
            backbone_features=features,
            point_inputs=point_inputs,
            mask_inputs=previous,
            high_res_features=high_res,
            multimask_output=tracker._use_multimask(True, point_inputs),
            gt_masks=target,  # read only in training: the target decides presence for memory (teacher forcing)
        )
        records.append({**_record(pairs, frame, outputs), "point_coords": coords, "point_labels": labels})
        previous = outputs[3].detach().float()  # a user sees the mask, not its gradient
    return records, _memory_entry(tracker, feats, frames.size, outputs, from_points=True)


def _tracked_slice(
    tracker: Sam3TrackerBase,
    frames: _FrameFeatures,
    frame: int,
    clip: int,
    pairs: torch.Tensor,
    low: torch.Tensor,
    memory: dict,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A slice predicted from memory alone, as the predictor's propagation does."""
    feats, features, high_res = frames.at(frame, clip, memory, prompted=False)
    outputs = tracker._forward_sam_heads(
        backbone_features=features,
        high_res_features=high_res,
        multimask_output=tracker._use_multimask(False, None),
        gt_masks=low[pairs],
    )
    return _record(pairs, frame, outputs), _memory_entry(tracker, feats, frames.size, outputs, from_points=False)


def _record(pairs: torch.Tensor, frame: int, outputs: tuple) -> dict[str, torch.Tensor]:
    candidates, _, ious, best, _, _, object_scores = outputs
    return {
        "pairs": pairs,
        "frame": torch.tensor(frame),
        "mask_logits": candidates,
        "iou_predictions": ious,
        "object_score_logits": object_scores,
        "best_mask_logits": best,
    }


def _memory_entry(tracker: Sam3TrackerBase, feats: list, size: tuple, outputs: tuple, from_points: bool) -> dict:
    """What later slices read from this one: its encoded mask, object pointer (and score, for memory selection)."""
    _, _, ious, _, high_res_best, obj_ptr, object_scores = outputs
    features, positions = tracker._encode_new_memory(
        image=None,
        current_vision_feats=feats,
        feat_sizes=[size],
        pred_masks_high_res=high_res_best,
        object_score_logits=object_scores,
        is_mask_from_pts=from_points,
    )
    entry = {"maskmem_features": features, "maskmem_pos_enc": positions, "obj_ptr": obj_ptr}
    if tracker.use_memory_selection:
        entry["eff_iou_score"] = tracker.cal_mem_score(object_scores, ious.max(-1)[0])
    return entry


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
    """SAM 2's video loss over the records of :func:`simulate_tracking`, averaged over records.

    Per record: focal + Dice on the candidate mask that fits best, where the structure shows (SAM backpropagates only
    the best of its multimask outputs, so the candidates can specialise); MSE between each candidate's predicted IoU
    and its actual IoU, where the structure shows; binary cross-entropy of the object score against whether it shows,
    on every slice (what stops propagation where a structure ends).

    Args:
        focal_weight, dice_weight: weights inside MONAI's ``DiceFocalLoss`` (SAM 2 uses 20 : 1).
        iou_weight, object_weight: weights of the IoU-prediction and object-score terms.
    """

    def __init__(
        self, focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0, object_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.weights = {"click_mask": 1.0, "click_iou": iou_weight, "click_object": object_weight}
        self.dice_focal = DiceFocalLoss(
            sigmoid=True, reduction="none", gamma=2.0, lambda_dice=dice_weight, lambda_focal=focal_weight
        )

    def forward(self, outputs: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``outputs``: :meth:`MedSam3.forward`'s, with ``click_rounds``; ``targets``: the N x S x S click targets.

        Returns the weighted ``loss`` and its terms. Without any record (no structure on a clip's first slice) all
        are zeros that keep the graph, so ``backward`` still works.
        """
        records = outputs["click_rounds"]
        if not records:
            zero = outputs["pred_masks"].float().mean() * 0.0
            return {**dict.fromkeys(self.weights, zero), "loss": zero}
        low = low_res_targets(targets, records[0]["mask_logits"].shape[-1])
        per_record = [self._terms(r, low[r["pairs"]]) for r in records]
        terms = {name: torch.stack([t[name] for t in per_record]).mean() for name in self.weights}
        terms["loss"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms

    def _terms(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        present = target.flatten(1).any(dim=1)
        scores = out["object_score_logits"].float()[:, 0]
        terms = {"click_object": F.binary_cross_entropy_with_logits(scores, present.float())}
        logits = out["mask_logits"].float()[present]  # absent slices: masks are "no object" by construction
        if not len(logits):
            zero = out["mask_logits"].float().sum() * 0.0
            return {**terms, "click_mask": zero, "click_iou": zero}
        expanded = target[present][:, None].expand_as(logits)
        per_mask = self.dice_focal(logits, expanded).mean(dim=(2, 3))  # M x K (Dice is constant over pixels)
        with torch.no_grad():
            predicted = logits > 0
            inter = (predicted & expanded.bool()).flatten(2).sum(-1)
            union = (predicted | expanded.bool()).flatten(2).sum(-1)
            actual_iou = inter / union.clamp_min(1)
        terms["click_mask"] = per_mask.min(dim=1).values.mean()
        terms["click_iou"] = F.mse_loss(out["iou_predictions"].float()[present], actual_iou)
        return terms
