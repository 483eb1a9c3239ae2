"""The Medical SAM3 module: SAM3's detector and tracker under one ``nn.Module``, and its glue to ``sam3``.

The module keeps no per-image state and its ``forward`` is the training forward (text prompts on every image,
optionally simulated click rounds on the tracker's heads); :class:`scripts.predictor.Medsam3Predictor` does
inference. Builders are in :mod:`scripts.model_builder`.
"""

from __future__ import annotations

import numpy as np
import torch
from sam3.model.data_misc import FindStage
from sam3.model.geometry_encoders import Prompt
from sam3.model.sam3_image import Sam3Image
from sam3.model.sam3_tracker_base import Sam3TrackerBase
from torch import nn

from .click_training import ClickSimulation, simulate_tracking
from .cpu_compat import move_tensor_caches
from .model_sizes import ModelSize

EMPTY_LOGIT = -1e4  # "no object here" in low-res logit maps (finite, so interpolation stays NaN-free)

__all__ = [
    "EMPTY_LOGIT",
    "MedSam3",
    "MedSam3Detector",
    "count_parameters",
    "default_device",
    "empty_geometry",
    "find_stage",
    "text_result_logits",
]


class MedSam3Detector(Sam3Image):
    """SAM3's detector; training matches predictions to targets in :mod:`scripts.losses`, not in the module.

    Upstream's training forward calls its own matcher on its own target format; ours leaves that out, so the
    same forward serves inference and fine-tuning. Parameters (and checkpoint keys) are those of ``Sam3Image``.
    """

    def back_convert(self, targets: object) -> None:
        return None

    def _compute_matching(self, out: dict, targets: object) -> None:
        return None

    def _encode_prompt(self, backbone_out: dict, find_input: FindStage, geometric_prompt: Prompt | None, *args, **kw):
        """Text prompts alone (``geometric_prompt`` None: how this project calls the detector) share the empty
        geometry's encoding: it depends on the image only, so it is computed once per image instead of once per
        (prompt, image) pair. Any other prompt takes upstream's path."""
        if geometric_prompt is not None or args or kw:
            return super()._encode_prompt(backbone_out, find_input, geometric_prompt, *args, **kw)
        images = torch.unique(find_input.img_ids)  # sorted
        backbone_out, feats, pos, sizes = self._get_img_feats(backbone_out, images)
        geometry, geometry_mask = self.geometry_encoder(
            geo_prompt=empty_geometry(len(images), images.device), img_feats=feats, img_sizes=sizes, img_pos_embeds=pos
        )
        pair_image = torch.searchsorted(images, find_input.img_ids)
        text = backbone_out["language_features"][:, find_input.text_ids]
        text_mask = backbone_out["language_mask"][find_input.text_ids]
        prompt = torch.cat([text, geometry[:, pair_image]])
        return prompt, torch.cat([text_mask, geometry_mask[pair_image]], dim=1), backbone_out

    def forward_presence_gated(self, backbone_out: dict, find_input: FindStage, threshold: float) -> dict:
        """``forward_grounding`` for text prompts at inference, with the mask head run only where it can matter.

        Detection and presence scores come first (encoder, decoder); the segmentation head then runs only for the
        (prompt, image) pairs with an instance scoring above ``threshold``. The other pairs' ``pred_masks`` are
        :data:`EMPTY_LOGIT`: a text result keeps no instance of theirs anyway, so label maps are unchanged.
        """
        prompt, prompt_mask, backbone_out = self._encode_prompt(backbone_out, find_input, None)
        backbone_out, encoder_out, _ = self._run_encoder(backbone_out, find_input, prompt, prompt_mask)
        out = {"encoder_hidden_states": encoder_out["encoder_hidden_states"]}
        out, hs = self._run_decoder(
            memory=out["encoder_hidden_states"],
            pos_embed=encoder_out["pos_embed"],
            src_mask=encoder_out["padding_mask"],
            out=out,
            prompt=prompt,
            prompt_mask=prompt_mask,
            encoder_out=encoder_out,
        )
        scores = out["pred_logits"].float().sigmoid().squeeze(-1)  # pairs x queries, presence folded in
        kept = (scores > threshold).any(dim=1).nonzero().flatten()
        size = backbone_out["backbone_fpn"][0].shape[-1]  # the mask head's output grid: the finest level
        masks = torch.full((*scores.shape, size, size), EMPTY_LOGIT, device=scores.device)
        if kept.numel():
            heads: dict = {}
            self._run_segmentation_heads(
                out=heads,
                backbone_out=backbone_out,
                img_ids=find_input.img_ids[kept],
                vis_feat_sizes=encoder_out["vis_feat_sizes"],
                encoder_hidden_states=out["encoder_hidden_states"][:, kept],
                prompt=prompt[:, kept],
                prompt_mask=prompt_mask[kept],
                hs=hs[:, kept],
            )
            masks[kept] = heads["pred_masks"].float()
        out["pred_masks"] = masks
        out["gated_pairs"] = int(scores.shape[0] - kept.numel())
        return out


class MedSam3(nn.Module):
    """The detector (text/box prompts) and the tracker (clicks, propagation across slices) of one model.

    The submodule names ``detector`` and ``tracker`` are those of the released SAM3 checkpoint, so its keys load
    unchanged. The module keeps no per-image state: :class:`scripts.predictor.Medsam3Predictor` does.
    """

    def __init__(self, detector: MedSam3Detector, tracker: Sam3TrackerBase, size: ModelSize) -> None:
        super().__init__()
        self.detector = detector
        self.tracker = tracker
        self.size = size
        self.interactive = True  # False when loaded without tracker weights: text prompts only (checkpoint.py)

    @property
    def image_size(self) -> int:
        return self.size.image_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        """Also move the tensor caches sam3 keeps outside parameters and buffers (see ``cpu_compat``)."""
        result = super()._apply(fn, recurse)
        move_tensor_caches(self)
        return result

    def forward(
        self,
        images: torch.Tensor,
        prompts: list[str],
        click_targets: torch.Tensor | None = None,
        click_simulation: ClickSimulation | None = None,
        click_generator: np.random.Generator | None = None,
        clip: int = 1,
    ) -> dict:
        """Detector outputs for every (prompt, image) pair, the training forward; optionally also tracking.

        ``images`` is B x 3 x S x S normalised to [-1, 1], image ``b * clip + t`` being slice t of clip b; query
        n = p * B + i is prompt p on image i. With ``click_targets`` (N x S x S binary masks, pair n as the queries),
        the tracker also runs the simulated sessions of :func:`scripts.click_training.simulate_tracking` on the same
        image features (``click_simulation``, default :class:`ClickSimulation`; ``click_generator`` draws its
        randomness), returned under ``"click_rounds"``. Going through ``forward`` lets DistributedDataParallel
        synchronise gradients.
        """
        num = images.shape[0]
        backbone_out = self.detector.backbone.forward_image(images)  # also computes the tracker's (SAM 2) neck
        backbone_out.update(self.detector.backbone.forward_text(prompts, device=images.device))
        img_ids = torch.arange(num, device=images.device).repeat(len(prompts))
        text_ids = torch.arange(len(prompts), device=images.device).repeat_interleave(num)
        out = self.detector.forward_grounding(
            backbone_out=backbone_out,
            find_input=find_stage(img_ids, text_ids),
            find_target=None,
            geometric_prompt=None,  # text alone: the shared geometry encoding (``MedSam3Detector._encode_prompt``)
        )
        if click_targets is not None:
            out["click_rounds"] = simulate_tracking(
                self.tracker,
                backbone_out["sam2_backbone_out"],
                click_targets,
                clip,
                click_simulation or ClickSimulation(),
                click_generator,
                text_masks=text_result_logits(out),
            )
        return out


@torch.no_grad()
def text_result_logits(out: dict, threshold: float = 0.5, best_above: float | None = None) -> torch.Tensor:
    """N x h x w: per (prompt, image) pair, the union of the instances scoring above ``threshold`` (the predictor's
    text result), :data:`EMPTY_LOGIT` where none does. With ``best_above``, a pair with no instance above
    ``threshold`` keeps its best one if that scores above ``best_above``: a slice that smoothing across slices
    may still show (:func:`scripts.presence_pass.smoothed_scores`)."""
    scores = out["pred_logits"].float().sigmoid().squeeze(-1)  # N x Q, presence already folded in
    masks = out["pred_masks"].float()
    kept = scores > threshold
    if best_above is not None:
        best = scores.max(dim=1, keepdim=True).values
        kept |= (scores == best) & (best > best_above) & ~kept.any(dim=1, keepdim=True)
    return torch.where(kept[..., None, None], masks, torch.full_like(masks, EMPTY_LOGIT)).amax(dim=1)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if device is None or device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def find_stage(img_ids: torch.Tensor, text_ids: torch.Tensor) -> FindStage:
    return FindStage(
        img_ids=img_ids,
        text_ids=text_ids,
        input_boxes=None,
        input_boxes_mask=None,
        input_boxes_label=None,
        input_points=None,
        input_points_mask=None,
    )


def empty_geometry(batch: int, device: torch.device) -> Prompt:
    return Prompt(
        box_embeddings=torch.zeros(0, batch, 4, device=device),
        box_mask=torch.zeros(batch, 0, dtype=torch.bool, device=device),
    )
