"""Build Medical SAM3 from the official ``sam3`` package's module classes, one builder per model size.

Every sub-builder takes a :class:`~scripts.model_sizes.ModelSize`, so ``base`` (the released checkpoints' exact
dimensions) and ``tiny`` (tests, CPU demos) are the same classes with other numbers. As in segment-anything's
``build_sam.py``: :func:`build_medsam3_base` and :func:`build_medsam3_tiny` over one private builder, and the
registry :data:`BUILDERS`; :func:`build_medsam3` picks from it by name, as the bundle configs do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from sam3.model.decoder import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerDecoderLayerv2,
    TransformerEncoderCrossAttention,
)
from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
from sam3.model.geometry_encoders import SequenceGeometryEncoder
from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
from sam3.model.necks import Sam3DualViTDetNeck
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.sam3_tracker_base import Sam3TrackerBase
from sam3.model.text_encoder_ve import VETextEncoder
from sam3.model.tokenizer_ve import SimpleTokenizer
from sam3.model.vitdet import ViT
from sam3.model.vl_combiner import SAM3VLBackbone
from sam3.sam.transformer import RoPEAttention
from torch import nn

from .cpu_compat import initialise_unset_parameters
from .model_sizes import MODEL_SIZES, TEXT_CONTEXT_LENGTH, ModelSize, bpe_vocabulary_path
from .network import MedSam3, MedSam3Detector, count_parameters, default_device

__all__ = ["BUILDERS", "build_medsam3", "build_medsam3_base", "build_medsam3_tiny"]

logger = logging.getLogger(__name__)


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
    tracker.prob_to_dropout_spatial_mem = 0.0  # read in training mode, set only by upstream's trainer: no dropout
    return tracker


def _build(size: ModelSize, device: str | torch.device | None, seed: int | None) -> MedSam3:
    """Build the model with initialised (random) weights; load real weights with :mod:`scripts.checkpoint`.

    ``seed`` makes two builds identical without touching the caller's RNG (training seeds it with
    ``set_determinism``); ``None`` draws from the global RNG.
    """
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        model = MedSam3(_detector(size, bpe_vocabulary_path()), _tracker(size), size)
        initialise_unset_parameters(model)
    model.eval()
    resolved = default_device(device)
    logger.info("Built Medical SAM3 %s (%.1fM parameters) on %s", size.name, count_parameters(model) / 1e6, resolved)
    return model.to(resolved)


def build_medsam3_base(
    device: str | torch.device | None = None, seed: int | None = 0, image_size: int | None = None
) -> MedSam3:
    """SAM3's dimensions: the released SAM3 and Medical SAM3 checkpoints load into it (GPU model).

    ``image_size`` 1008 (SAM3's, the default) or 504 (Medical SAM3's 3D checkpoint; about 4 times cheaper per slice).
    """
    return _build(_sized(MODEL_SIZES["base"], image_size), device, seed)


def build_medsam3_tiny(
    device: str | torch.device | None = None, seed: int | None = 0, image_size: int | None = None
) -> MedSam3:
    """The same classes, small: tests, CPU benchmarks and the demo model."""
    return _build(_sized(MODEL_SIZES["tiny"], image_size), device, seed)


def build_medsam3_small(
    device: str | torch.device | None = None, seed: int | None = 0, image_size: int | None = None
) -> MedSam3:
    """Twice ``tiny``'s widths and more layers: a demo model that trains on a CPU and holds more than ``tiny``."""
    return _build(_sized(MODEL_SIZES["small"], image_size), device, seed)


BUILDERS: dict[str, Callable[..., MedSam3]] = {
    "base": build_medsam3_base,
    "small": build_medsam3_small,
    "tiny": build_medsam3_tiny,
}


def build_medsam3(
    model_size: str = "base",
    device: str | torch.device | None = None,
    seed: int | None = 0,
    image_size: int | None = None,
) -> MedSam3:
    """The builder of ``model_size`` (a key of :data:`BUILDERS`), as the bundle configs call it.

    ``image_size`` (pixels of the square model input) defaults to the size's own; the configs read it from the
    checkpoint (:func:`scripts.checkpoint.checkpoint_image_size`), so a file runs at the resolution it was trained at.
    """
    if model_size not in BUILDERS:
        raise ValueError(f"Unknown model_size {model_size!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[model_size](device=device, seed=seed, image_size=image_size)


def _sized(size: ModelSize, image_size: int | None) -> ModelSize:
    """``size`` at another input resolution; the position tables follow, the weights' shapes do not change."""
    if image_size is None or image_size == size.image_size:
        return size
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size % size.patch_size:
        raise ValueError(f"image_size must be a multiple of the patch size {size.patch_size}, got {image_size!r}")
    if image_size < size.pretrain_image_size:
        raise ValueError(f"image_size must be at least {size.pretrain_image_size} for {size.name}, got {image_size}")
    return dataclasses.replace(size, image_size=image_size)
