"""The model sizes: every dimension the detector and tracker are built from.

``base`` has the exact SAM3 detector + tracker dimensions, so the released SAM3 (``sam3.pt``) and Medical SAM3
checkpoints load into it by their own key names. ``tiny`` uses the same classes with small dimensions: it runs on
two CPU cores in about a second and is what the tests and CPU benchmarks use.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["MODEL_SIZES", "TEXT_CONTEXT_LENGTH", "ModelSize", "bpe_vocabulary_path"]


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
    "small": ModelSize(  # twice tiny's widths, deeper: issue #9's step up when tiny's Dice falls short on phantoms
        name="small",
        image_size=224,
        patch_size=14,
        pretrain_image_size=112,
        vit_dim=96,
        vit_depth=4,
        vit_heads=4,
        vit_mlp_ratio=2.0,
        window_size=8,
        global_attention_blocks=(1, 3),
        text_width=32,  # the token table is 49408 x text_width: wider would pass the 20 MB a committed file may have
        text_layers=2,
        text_heads=2,
        d_model=64,
        heads=4,
        ffn_dim=128,
        encoder_layers=2,
        decoder_layers=2,
        geometry_layers=1,
        num_queries=10,
        tracker_layers=1,
        memory_dim=32,
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
