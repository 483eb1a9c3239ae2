"""Build Medical SAM3 from the official ``sam3`` package's module classes, at named sizes.

``base`` has the exact SAM3 detector + tracker dimensions, so the released SAM3 (``sam3.pt``) and Medical SAM3
checkpoints load into it by their own key names. ``tiny`` uses the same classes with small dimensions: it runs
on two CPU cores in about a second and is what the tests and CPU benchmarks use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sam3.model.data_misc import FindStage
from sam3.model.decoder import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerDecoderLayerv2,
    TransformerEncoderCrossAttention,
)
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import Prompt, SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_image import Sam3Image
from sam3.model.sam3_tracker_base import Sam3TrackerBase
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone
from sam3.sam.transformer import RoPEAttention
from torch import nn

from .cpu_compat import initialise_unset_parameters, move_tensor_caches

if TYPE_CHECKING:  # click_training -> click_simulation -> predictor imports this module
    from .click_training import ClickSimulation

__all__ = ["MODEL_SIZES", "MedSam3", "ModelSize", "bpe_vocabulary_path", "build_medsam3"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of one model size; every module of the detector and tracker is built from these."""

    name: str
    image_size: int  # square model input, pixels
    patch_size: int
    pretrain_image_size: int  # size of the tiled absolute position embedding
    vit_dim: int
    vit_depth: int
    vit_heads: int
    vit_mlp_ratio: float
    window_size: int
    global_attention_blocks: tuple[int, ...]
    text_width: int
    text_layers: int
    text_heads: int
    d_model: int  # width of the DETR encoder/decoder, heads and tracker
    heads: int
    ffn_dim: int
    encoder_layers: int
    decoder_layers: int
    geometry_layers: int
    num_queries: int
    tracker_layers: int
    memory_dim: int
    num_maskmem: int

    @property
    def feature_size(self) -> int:
        """Side of the lowest-resolution feature map (72 for base)."""
        return self.image_size // self.patch_size


MODEL_SIZES: dict[str, ModelSize] = {
    "base": ModelSize(
        name="base",
        image_size=1008,
        patch_size=14,
        pretrain_image_size=336,
        vit_dim=1024,
        vit_depth=32,
        vit_heads=16,
        vit_mlp_ratio=4.625,
        window_size=24,
        global_attention_blocks=(7, 15, 23, 31),
        text_width=1024,
        text_layers=24,
        text_heads=16,
        d_model=256,
        heads=8,
        ffn_dim=2048,
        encoder_layers=6,
        decoder_layers=6,
        geometry_layers=3,
        num_queries=200,
        tracker_layers=4,
        memory_dim=64,
        num_maskmem=7,
    ),
    "tiny": ModelSize(
        name="tiny",
        image_size=224,
        patch_size=14,
        pretrain_image_size=112,
        vit_dim=48,
        vit_depth=2,
        vit_heads=2,
        vit_mlp_ratio=2.0,
        window_size=8,
        global_attention_blocks=(1,),
        text_width=32,
        text_layers=1,
        text_heads=2,
        d_model=32,
        heads=4,
        ffn_dim=64,
        encoder_layers=1,
        decoder_layers=1,
        geometry_layers=1,
        num_queries=10,
        tracker_layers=1,
        memory_dim=16,
        num_maskmem=7,
    ),
}

TEXT_CONTEXT_LENGTH = 32


def bpe_vocabulary_path() -> Path:
    """The CLIP BPE vocabulary shipped in ``open_clip_torch`` (the ``sam3`` wheel lacks its own copy)."""
    path = Path(str(resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"BPE vocabulary not found at {path}: is open_clip_torch installed?")
    return path


class MedSam3Detector(Sam3Image):
    """SAM3's detector; training matches predictions to targets in :mod:`scripts.losses`, not in the module.

    Upstream's training forward calls its own matcher on its own target format; ours leaves that out, so the
    same forward serves inference and fine-tuning. Parameters (and checkpoint keys) are those of ``Sam3Image``.
    """

    def back_convert(self, targets: object) -> None:
        return None

    def _compute_matching(self, out: dict, targets: object) -> None:
        return None


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
    ) -> dict:
        """Detector outputs for every (prompt, image) pair, the training forward; optionally also click rounds.

        ``images`` is B x 3 x S x S normalised to [-1, 1]; query n = p * B + i is prompt p on image i. With
        ``click_targets`` (N x S x S binary masks, pair n as the queries), the tracker's SAM heads also run the
        simulated interactive rounds of :func:`scripts.click_training.simulate_click_rounds` (``click_simulation``,
        default :class:`ClickSimulation`; ``click_generator`` draws its randomness) on the same image features,
        returned under ``"click_rounds"``. Going through ``forward`` lets DistributedDataParallel synchronise
        gradients.
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
            geometric_prompt=empty_geometry(len(img_ids), images.device),
        )
        if click_targets is not None:
            from .click_training import ClickSimulation, simulate_click_rounds

            out["click_rounds"] = simulate_click_rounds(
                self.tracker,
                backbone_out["sam2_backbone_out"],
                click_targets,
                img_ids,
                click_simulation or ClickSimulation(),
                click_generator,
            )
        return out


def _attention(size: ModelSize, dropout: float, batch_first: bool = False) -> MultiheadAttention:
    return MultiheadAttention(num_heads=size.heads, dropout=dropout, embed_dim=size.d_model, batch_first=batch_first)


def _vision_backbone(size: ModelSize) -> Sam3DualViTDetNeck:
    vit = ViT(
        img_size=size.image_size,
        pretrain_img_size=size.pretrain_image_size,
        patch_size=size.patch_size,
        embed_dim=size.vit_dim,
        depth=size.vit_depth,
        num_heads=size.vit_heads,
        mlp_ratio=size.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=size.global_attention_blocks,
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=size.window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    # precompute_resolution=None: upstream precomputes this cache on "cuda"; it fills lazily on first use instead.
    position_encoding = PositionEmbeddingSine(num_pos_feats=size.d_model, normalize=True, temperature=10000)
    return Sam3DualViTDetNeck(
        trunk=vit,
        position_encoding=position_encoding,
        d_model=size.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        add_sam2_neck=True,  # the tracker reads its own neck's features, as in the released checkpoint
    )


def _encoder_layer(size: ModelSize, image_encoder: bool) -> TransformerEncoderLayer:
    """The DETR encoder's layer (batch-first, positions at self-attention) or the geometry encoder's."""
    return TransformerEncoderLayer(
        activation="relu",
        d_model=size.d_model,
        dim_feedforward=size.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=image_encoder,
        pos_enc_at_cross_attn_keys=not image_encoder,
        pos_enc_at_cross_attn_queries=False,
        pre_norm=True,
        self_attention=_attention(size, 0.1, batch_first=image_encoder),
        cross_attention=_attention(size, 0.1, batch_first=image_encoder),
    )


def _transformer(size: ModelSize) -> TransformerWrapper:
    encoder = TransformerEncoderFusion(
        layer=_encoder_layer(size, image_encoder=True),
        num_layers=size.encoder_layers,
        d_model=size.d_model,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder_layer = TransformerDecoderLayer(
        activation="relu",
        d_model=size.d_model,
        dim_feedforward=size.ffn_dim,
        dropout=0.1,
        cross_attention=_attention(size, 0.1),
        n_heads=size.heads,
        use_text_cross_attention=True,
    )
    # resolution/stride=None: upstream precomputes box-bias coordinates on "cuda"; they are cached lazily instead.
    decoder = TransformerDecoder(
        layer=decoder_layer,
        num_layers=size.decoder_layers,
        num_queries=size.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=size.d_model,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=None,
        stride=None,
        use_act_checkpoint=True,
        presence_token=True,
    )
    return TransformerWrapper(encoder=encoder, decoder=decoder, d_model=size.d_model)


def _geometry_encoder(size: ModelSize) -> SequenceGeometryEncoder:
    return SequenceGeometryEncoder(
        pos_enc=PositionEmbeddingSine(num_pos_feats=size.d_model, normalize=True, temperature=10000),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=size.d_model,
        num_layers=size.geometry_layers,
        layer=_encoder_layer(size, image_encoder=False),
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )


def _segmentation_head(size: ModelSize) -> UniversalSegmentationHead:
    pixel_decoder = PixelDecoder(
        num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=size.d_model, compile_mode=None
    )
    return UniversalSegmentationHead(
        hidden_dim=size.d_model,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_attention(size, 0.0),
        pixel_decoder=pixel_decoder,
    )


def _detector(size: ModelSize, bpe_path: Path) -> MedSam3Detector:
    text_encoder = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=str(bpe_path)),
        d_model=size.d_model,
        width=size.text_width,
        heads=size.text_heads,
        layers=size.text_layers,
        context_length=TEXT_CONTEXT_LENGTH,
    )
    scoring_mlp = MLP(
        input_dim=size.d_model,
        hidden_dim=size.ffn_dim,
        output_dim=size.d_model,
        num_layers=2,
        dropout=0.1,
        residual=True,
        out_norm=nn.LayerNorm(size.d_model),
    )
    return MedSam3Detector(
        backbone=SAM3VLBackbone(visual=_vision_backbone(size), text=text_encoder, scalp=1),
        transformer=_transformer(size),
        input_geometry_encoder=_geometry_encoder(size),
        segmentation_head=_segmentation_head(size),
        num_feature_levels=1,
        o2m_mask_predict=True,
        dot_prod_scoring=DotProductScoring(d_model=size.d_model, d_proj=size.d_model, prompt_mlp=scoring_mlp),
        use_instance_query=False,
        multimask_output=True,
        supervise_joint_box_scores=True,
        matcher=None,
    )


def _tracker(size: ModelSize) -> Sam3TrackerBase:
    feat = size.feature_size
    memory_encoder = SimpleMaskEncoder(
        out_dim=size.memory_dim,
        position_encoding=PositionEmbeddingSine(num_pos_feats=size.memory_dim, normalize=True, temperature=10000),
        mask_downsampler=SimpleMaskDownSampler(
            kernel_size=3, stride=2, padding=1, interpol_size=[feat * 16, feat * 16], embed_dim=size.d_model
        ),
        fuser=SimpleFuser(
            layer=CXBlock(dim=size.d_model, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
            num_layers=2,
        ),
        in_dim=size.d_model,
    )
    rope = {"num_heads": 1, "downsample_rate": 1, "dropout": 0.1, "rope_theta": 10000.0, "feat_sizes": [feat, feat]}
    memory_layer = TransformerDecoderLayerv2(
        cross_attention_first=False,
        activation="relu",
        dim_feedforward=size.ffn_dim,
        dropout=0.1,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=RoPEAttention(embedding_dim=size.d_model, use_fa3=False, use_rope_real=False, **rope),
        d_model=size.d_model,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        cross_attention=RoPEAttention(
            embedding_dim=size.d_model,
            kv_in_dim=size.memory_dim,
            rope_k_repeat=True,
            use_fa3=False,
            use_rope_real=False,
            **rope,
        ),
    )
    memory_attention = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[],
        batch_first=True,
        d_model=size.d_model,
        frozen=False,
        pos_enc_at_input=True,
        layer=memory_layer,
        num_layers=size.tracker_layers,
        use_act_checkpoint=False,
    )
    tracker = Sam3TrackerBase(
        backbone=None,
        transformer=TransformerWrapper(encoder=memory_attention, decoder=None, d_model=size.d_model),
        maskmem_backbone=memory_encoder,
        num_maskmem=size.num_maskmem,
        image_size=size.image_size,
        backbone_stride=size.patch_size,
        max_cond_frames_in_attn=4,
        multimask_output_in_sam=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        multimask_output_for_tracking=True,
        forward_backbone_per_frame_for_eval=True,
        sam_mask_decoder_extra_args={
            "dynamic_multimask_via_stability": True,
            "dynamic_multimask_stability_delta": 0.05,
            "dynamic_multimask_stability_thresh": 0.98,
        },
    )
    tracker.iter_use_prev_mask_pred = True  # clicks may refine a previous mask (set by upstream's predictor class)
    # Read by the SAM heads in training mode but never set upstream: the target, not the predicted object score,
    # decides whether a mask is kept, so a present structure's mask gets gradients from the first step (SAM 2).
    tracker.teacher_force_obj_scores_for_mem = True
    return tracker


def build_medsam3(model_size: str = "base", device: str | torch.device | None = None, seed: int | None = 0) -> MedSam3:
    """Build the model with initialised (random) weights; load real weights with :mod:`scripts.checkpoint`.

    Args:
        model_size: a key of :data:`MODEL_SIZES` (``base`` for real checkpoints, ``tiny`` for tests).
        device: where to put the model; ``None`` picks CUDA when available, else CPU.
        seed: seeds the random initialisation so that two builds are identical; ``None`` leaves the RNG alone.
    """
    if model_size not in MODEL_SIZES:
        raise ValueError(f"Unknown model_size {model_size!r}; choose one of {sorted(MODEL_SIZES)}")
    size = MODEL_SIZES[model_size]
    if seed is not None:
        torch.manual_seed(seed)
    model = MedSam3(_detector(size, bpe_vocabulary_path()), _tracker(size), size)
    initialise_unset_parameters(model)
    model.eval()
    resolved = default_device(device)
    logger.info("Built Medical SAM3 %s (%.1fM parameters) on %s", model_size, _count(model) / 1e6, resolved)
    return model.to(resolved)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available; anything else is passed to ``torch.device``."""
    if device is None or device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _count(model: nn.Module) -> int:
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
