"""Parameter-efficient adaptation of the image encoder for on-site fine-tuning, as in MA-SAM (arXiv 2309.08842).

Two kinds of small trainable additions to the ViT blocks of ``detector.backbone.vision_backbone.trunk``:

* LoRA (:class:`LoRALinear`): a low-rank update ``(alpha / r) * B @ A`` beside a frozen ``nn.Linear``;
* 3D adapters (:class:`SliceAdapter3D`): a bottleneck with a depthwise 3D convolution across neighbouring slices,
  run on the output of each chosen block.

Both start as the identity (``B = 0``, adapter up-projection = 0): an adapted model gives the base model's outputs
until it is trained.

Checkpoint keys: adaptation never renames a base parameter. :class:`LoRALinear` holds the wrapped layer's own
``weight`` and ``bias`` under those names (``attn.qkv.weight`` stays ``attn.qkv.weight``) and only adds
``attn.qkv.lora_A`` and ``attn.qkv.lora_B``; a 3D adapter is a child ``adapter3d`` of its block, run by a forward hook
on the block, so the block's own keys are unchanged too. A SAM3 / Medical SAM3 checkpoint therefore matches an
adapted model key for key, except for the adaptation keys it lacks (:func:`is_adaptation_key`), and adapter files
hold those keys only (:func:`adaptation_state_dict`, :func:`load_adaptation`).

Slice contract of the 3D adapters: the batch dimension of the ViT's B x H x W x C tokens is read as B consecutive
slices of ONE volume, in order. Training and inference batches must therefore be contiguous slice clips
(``Medsam3Predictor.encode`` batches consecutive slices); the first and last slice of a clip see zero padding, and a
batch of one slice gets no context from its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from sam3.model.vitdet import ViT
from torch import nn

__all__ = [
    "ADAPTATION_ATTRIBUTE",
    "ADAPTER_NAME",
    "HEAD_PREFIXES",
    "LORA_TARGETS",
    "MODES",
    "LoRALinear",
    "SliceAdapter3D",
    "adaptation_state_dict",
    "apply_3d_adapters",
    "apply_lora",
    "configure_adaptation",
    "freeze_for_mode",
    "image_encoder",
    "is_adaptation_key",
    "load_adaptation",
]

TRUNK_PATH = "detector.backbone.vision_backbone.trunk"
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_PARAMETERS = ("lora_A", "lora_B")
ADAPTER_NAME = "adapter3d"  # child module name of the 3D adapter inside a ViT block
MODES = ("full", "lora", "adapter3d")
ADAPTATION_ATTRIBUTE = "adaptation"  # the configure_adaptation arguments, recorded on the model
# Trained with the adapters when ``heads=True`` (MA-SAM also trains SAM's mask decoder): the detector's DETR decoder,
# mask and scoring heads, and the whole tracker: the heads that answer boxes and clicks and the memory that carries a
# mask across slices.
HEAD_PREFIXES = (
    "detector.transformer.decoder.",
    "detector.segmentation_head.",
    "detector.dot_prod_scoring.",
    "tracker.",  # prompt encoder, mask decoder, memory attention, memory encoder, object pointers
)


class LoRALinear(nn.Module):
    """``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` for x of shape ... x in_features, with W and b frozen.

    ``weight`` and ``bias`` are the wrapped layer's own parameters (same tensors, same names), so base checkpoint keys
    still fit. ``lora_A`` (r x in) is Kaiming-initialised and ``lora_B`` (out x r) starts at zero, so the output is
    exactly the wrapped layer's until ``lora_B`` is trained.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"Need rank >= 1, alpha > 0 and 0 <= dropout < 1; got {rank=}, {alpha=}, {dropout=}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scaling = alpha / rank
        base.requires_grad_(False)
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None when the wrapped layer has no bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SliceAdapter3D(nn.Module):
    """MA-SAM 3D adapter: ``x + up(conv3d(gelu(down(norm(x)))))`` on x of shape B x H x W x C, B = consecutive slices.

    The depthwise convolution runs over (slice, row, column) of the C -> ``bottleneck`` projection with an odd
    ``kernel``, padded so shapes are kept; ``(3, 1, 1)`` mixes each token with the same token of the slice before and
    after. ``up`` starts at zero, so the adapter is the identity until trained.
    """

    def __init__(self, dim: int, bottleneck: int = 32, kernel: Sequence[int] = (3, 1, 1)) -> None:
        super().__init__()
        kernel = tuple(kernel)
        if len(kernel) != 3 or any(k < 1 or k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel must be three odd sizes (slices, rows, columns), got {kernel}")
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"Need dim >= 1 and bottleneck >= 1, got {dim=}, {bottleneck=}")
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        padding = tuple(k // 2 for k in kernel)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel, padding=padding, groups=bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"SliceAdapter3D expects B x H x W x C tokens, got shape {tuple(x.shape)}")
        hidden = self.act(self.down(self.norm(x)))  # B x H x W x c
        hidden = self.conv(hidden.permute(3, 0, 1, 2).unsqueeze(0))  # 1 x c x B x H x W: the batch is the depth
        return x + self.up(hidden.squeeze(0).permute(1, 2, 3, 0))


def image_encoder(model: nn.Module) -> ViT:
    """The SAM3 ViT image encoder of a :class:`scripts.network.MedSam3` (``detector...trunk``)."""
    try:
        trunk = model.get_submodule(TRUNK_PATH)
    except AttributeError as error:
        raise ValueError(f"{type(model).__name__} has no image encoder at {TRUNK_PATH}: is it a MedSam3?") from error
    if not isinstance(trunk, ViT):
        raise ValueError(f"{TRUNK_PATH} is a {type(trunk).__name__}, not a sam3 ViT")
    return trunk


def _block_indices(trunk: ViT, blocks: Iterable[int] | None) -> list[int]:
    depth = len(trunk.blocks)
    if blocks is None:
        return list(range(depth))
    indices = list(blocks)
    if not indices or any(not isinstance(i, int) or not 0 <= i < depth for i in indices):
        raise ValueError(f"blocks must be a non-empty list of block indices in 0..{depth - 1}, got {indices}")
    return sorted(set(indices))


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = LORA_TARGETS,
    blocks: Iterable[int] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the ``targets`` Linear layers of the chosen ViT blocks (all by default) in :class:`LoRALinear`.

    Returns the names of the new (trainable) parameters. Base weights may be loaded before or after: their keys are
    unchanged. Raises ValueError when a target is not an ``nn.Linear`` (e.g. LoRA was already applied).
    """
    trunk = image_encoder(model)
    if not targets:
        raise ValueError("targets is empty: name the Linear layers to adapt, e.g. " + ", ".join(LORA_TARGETS))
    layers = []
    for index in _block_indices(trunk, blocks):
        for target in targets:
            try:
                layer = trunk.blocks[index].get_submodule(target)
            except AttributeError as error:
                raise ValueError(f"ViT block {index} has no layer {target!r}; known: {LORA_TARGETS}") from error
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"ViT block {index} layer {target!r} is a {type(layer).__name__}, not an nn.Linear")
            layers.append((index, target, layer))
    names = []
    for index, target, layer in layers:  # every target was checked first: a bad one leaves the model untouched
        parent_name, _, attribute = target.rpartition(".")
        parent = trunk.blocks[index].get_submodule(parent_name)
        setattr(parent, attribute, LoRALinear(layer, rank, alpha, dropout))
        names += [f"{TRUNK_PATH}.blocks.{index}.{target}.{p}" for p in LORA_PARAMETERS]
    return names


def _run_adapter(block: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: a block's output goes through its 3D adapter (a module-level function, so deepcopy stays valid)."""
    return getattr(block, ADAPTER_NAME)(output)


def apply_3d_adapters(
    model: nn.Module,
    bottleneck: int = 32,
    kernel: Sequence[int] = (3, 1, 1),
    blocks: Iterable[int] | None = None,
) -> list[str]:
    """Add a :class:`SliceAdapter3D` after each chosen ViT block (all by default); return the new parameter names.

    The adapter becomes the block's child ``adapter3d`` and a forward hook runs it on the block's output (after the
    attention and MLP residuals), so upstream's ``Block.forward`` and the block's checkpoint keys stay as they are.
    """
    trunk = image_encoder(model)
    indices = _block_indices(trunk, blocks)
    adapted = [i for i in indices if hasattr(trunk.blocks[i], ADAPTER_NAME)]
    if adapted:
        raise ValueError(f"ViT blocks {adapted} already have a 3D adapter")
    reference = trunk.blocks[indices[0]].norm1.weight
    names = []
    for index in indices:
        block = trunk.blocks[index]
        adapter = SliceAdapter3D(block.norm1.normalized_shape[-1], bottleneck, kernel)
        block.add_module(ADAPTER_NAME, adapter.to(device=reference.device, dtype=reference.dtype))
        block.register_forward_hook(_run_adapter)
        names += [f"{TRUNK_PATH}.blocks.{index}.{ADAPTER_NAME}.{name}" for name, _ in adapter.named_parameters()]
    return names


def _is_lora_key(name: str) -> bool:
    return name.rpartition(".")[2] in LORA_PARAMETERS


def _is_adapter_key(name: str) -> bool:
    return ADAPTER_NAME in name.split(".")[:-1]


def is_adaptation_key(name: str) -> bool:
    """Whether a state-dict key belongs to LoRA or a 3D adapter (what a base SAM3 checkpoint lacks)."""
    return _is_lora_key(name) or _is_adapter_key(name)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown adaptation mode {mode!r}; valid modes: {', '.join(MODES)}")


def freeze_for_mode(model: nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for a fine-tuning mode and return the names of the trainable parameters.

    ``full``: every parameter, text encoder and any adaptation included. ``lora``: the LoRA parameters.
    ``adapter3d``: the 3D adapters and the LoRA parameters. Adapter modes also train the heads
    (:data:`HEAD_PREFIXES`) when the model was adapted with ``heads=True``. The adaptation a mode trains must already
    be applied (:func:`configure_adaptation` does both).
    """
    _check_mode(mode)
    names = [name for name, _ in model.named_parameters()]
    if mode == "full":
        trainable = names
    else:
        applied = _is_lora_key if mode == "lora" else _is_adapter_key  # what configure_adaptation adds for the mode
        if not any(applied(name) for name in names):
            raise ValueError(
                f"Mode {mode!r} has nothing to train: apply it first with configure_adaptation(model, {mode!r})"
            )
        trained = _is_lora_key if mode == "lora" else is_adaptation_key
        heads = _trains_heads(model)
        trainable = [name for name in names if trained(name) or (heads and name.startswith(HEAD_PREFIXES))]
    chosen = set(trainable)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in chosen)
    return trainable


def _trains_heads(model: nn.Module) -> bool:
    return bool((getattr(model, ADAPTATION_ATTRIBUTE, None) or {}).get("heads", False))


def configure_adaptation(
    model: nn.Module,
    mode: str,
    rank: int = 8,
    alpha: float = 16.0,
    bottleneck: int = 32,
    kernel: Sequence[int] = (3, 1, 1),
    heads: bool = False,
) -> list[str]:
    """Apply what ``mode`` needs, freeze the rest and return the names of the trainable parameters.

    ``full`` adds nothing (everything trains), ``lora`` adds LoRA (``rank``, ``alpha``), ``adapter3d`` adds LoRA and
    3D adapters (``bottleneck``, ``kernel``); ``heads`` also trains (and saves) the decoder and heads in those modes.
    Call it once per model, before building the optimiser; the arguments are recorded as ``model.adaptation``
    (:data:`ADAPTATION_ATTRIBUTE`).
    """
    _check_mode(mode)
    if not isinstance(heads, bool):
        raise ValueError(f"heads must be True or False, got {heads!r}")
    if getattr(model, ADAPTATION_ATTRIBUTE, None) is not None:
        raise ValueError(f"The model is already adapted ({getattr(model, ADAPTATION_ATTRIBUTE)})")
    config: dict[str, object] = {"mode": mode}
    if mode in ("lora", "adapter3d"):
        apply_lora(model, rank=rank, alpha=alpha)
        config.update(rank=rank, alpha=alpha, heads=heads)
    if mode == "adapter3d":
        apply_3d_adapters(model, bottleneck=bottleneck, kernel=kernel)
        config.update(bottleneck=bottleneck, kernel=list(kernel))
    # Saved with adapter files, so a loader rebuilds the same modules before loading their weights.
    setattr(model, ADAPTATION_ATTRIBUTE, config)
    return freeze_for_mode(model, mode)


def adaptation_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA and 3D-adapter tensors (and the heads, if trained): what an adapter-mode run needs to save."""
    heads = _trains_heads(model)
    state = {
        key: value
        for key, value in model.state_dict().items()
        if is_adaptation_key(key) or (heads and key.startswith(HEAD_PREFIXES))
    }
    if not state:
        raise ValueError("The model has no LoRA or 3D adapter parameters; call configure_adaptation first")
    return state


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_adaptation(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load adaptation tensors (from :func:`adaptation_state_dict`) into a model given the same adaptation.

    Raises ValueError naming unexpected keys, shape mismatches and, when ``strict``, adaptation keys left missing.
    Other base weights are not touched: load them with :func:`scripts.checkpoint.load_checkpoint`.
    """
    expected = adaptation_state_dict(model)
    if not state_dict:
        raise ValueError("The adaptation state dict is empty")
    unexpected = sorted(key for key in state_dict if key not in expected)
    missing = sorted(key for key in expected if key not in state_dict) if strict else []
    wrong = [
        f"{key} {tuple(value.shape)} (model: {tuple(expected[key].shape)})"
        for key, value in sorted(state_dict.items())
        if key in expected and value.shape != expected[key].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not LoRA/adapter parameters of this model): {_listed(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if wrong:
        problems.append(f"shape mismatches: {_listed(wrong)}")
    if problems:
        raise ValueError(
            "Cannot load adaptation weights: " + "; ".join(problems) + ". Apply the same configure_adaptation "
            "(mode, rank, bottleneck, kernel) as when they were saved."
        )
    model.load_state_dict(dict(state_dict), strict=False)
