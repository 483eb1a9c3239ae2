"""The few workarounds the ``sam3`` package (0.1.4) needs to run off CUDA, kept in one place.

Upstream assumes a CUDA device in a handful of spots (see the field notes). The model builder avoids most of
them by argument (``precompute_resolution=None``, ``resolution=None``); what remains is handled here:

* the tracker calls ``tensor.cuda()`` on its memories and ``tensor.pin_memory()`` on temporal positions:
  :func:`device_fallbacks` turns both into no-ops while a CPU model runs (a no-op context on CUDA, so behaviour
  on a GPU is untouched);
* ``RoPEAttention.freqs_cis`` and the position-encoding caches are plain tensor attributes that ``Module.to``
  does not move: :func:`move_tensor_caches` re-homes them whenever the model changes device;
* the text encoder's ``positional_embedding`` is created with ``torch.empty`` and only filled by a checkpoint:
  :func:`initialise_unset_parameters` gives it a proper initialisation (otherwise training produces NaN);
* :func:`precision` picks the compute precision by device (bf16 autocast on CUDA, fp32 on the CPU);
* upstream asserts activation checkpointing whenever its fusion encoder and decoder train: :func:`keep_activations`
  lets a step keep the activations instead (no recomputation in the backward pass), for when memory is plentiful.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator

import sam3.model.act_ckpt_utils
import sam3.model.maskformer_segmentation
import sam3.model.text_encoder_ve
import sam3.model.vitdet
import torch
from sam3.model.decoder import TransformerDecoder
from sam3.model.position_encoding import PositionEmbeddingSine
from sam3.model.text_encoder_ve import TextTransformer
from sam3.sam.transformer import RoPEAttention
from torch import nn

_patch_lock = threading.RLock()


@contextlib.contextmanager
def device_fallbacks(device: torch.device) -> Iterator[None]:
    """Run sam3 code on ``device``; on CPU, ``Tensor.cuda`` and ``Tensor.pin_memory`` return the tensor itself.

    The patch is process-wide while active, so it is serialised with a lock; on CUDA this does nothing.
    """
    if device.type == "cuda":
        yield
        return
    with _patch_lock:
        original_cuda, original_pin = torch.Tensor.cuda, torch.Tensor.pin_memory

        def _stay(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            return tensor

        torch.Tensor.cuda, torch.Tensor.pin_memory = _stay, _stay
        try:
            yield
        finally:
            torch.Tensor.cuda, torch.Tensor.pin_memory = original_cuda, original_pin


def _call_directly(function: Callable, *args: object, use_reentrant: bool = False, **kwargs: object) -> object:
    return function(*args, **kwargs)


# Where sam3 reaches torch.utils.checkpoint: the module (``checkpoint.checkpoint(...)``) or the bare function.
_CHECKPOINT_REFERENCES = (
    (sam3.model.act_ckpt_utils, types.SimpleNamespace(checkpoint=_call_directly)),
    (sam3.model.maskformer_segmentation, types.SimpleNamespace(checkpoint=_call_directly)),
    (sam3.model.vitdet, types.SimpleNamespace(checkpoint=_call_directly)),
    (sam3.model.text_encoder_ve, _call_directly),
)


@contextlib.contextmanager
def keep_activations(enabled: bool = True) -> Iterator[None]:
    """Run sam3's checkpointed blocks without recomputing them in the backward pass (same gradients, more memory).

    The swap of sam3's references to ``torch.utils.checkpoint`` is process-wide while active, so it is serialised
    with a lock. On ``tiny`` on 2 CPU cores recomputation was a third of a training step.
    """
    if not enabled:
        yield
        return
    with _patch_lock:
        originals = [module.checkpoint for module, _ in _CHECKPOINT_REFERENCES]
        for module, replacement in _CHECKPOINT_REFERENCES:
            module.checkpoint = replacement
        try:
            yield
        finally:
            for (module, _), original in zip(_CHECKPOINT_REFERENCES, originals, strict=True):
                module.checkpoint = original


def move_tensor_caches(model: nn.Module) -> None:
    """Put the tensors sam3 keeps as plain attributes on the device of the module that owns them."""
    for module in model.modules():
        if hasattr(module, "_device"):  # Sam3Image caches its device and only forgets it in its own .to()
            module._device = None
        if isinstance(module, RoPEAttention):
            device = module.q_proj.weight.device
            module.freqs_cis = module.freqs_cis.to(device)
            if module.use_rope_real:
                module.freqs_cis_real = module.freqs_cis.real
                module.freqs_cis_imag = module.freqs_cis.imag
        elif isinstance(module, PositionEmbeddingSine):
            module.cache = {}
        elif isinstance(module, TransformerDecoder) and hasattr(module, "coord_cache"):
            module.coord_cache = {}


def initialise_unset_parameters(model: nn.Module) -> None:
    """Initialise the parameters sam3 leaves as ``torch.empty`` (only a checkpoint would fill them)."""
    for module in model.modules():
        if isinstance(module, TextTransformer):
            nn.init.normal_(module.positional_embedding, std=0.01)
            if isinstance(module.text_projection, nn.Parameter):
                nn.init.normal_(module.text_projection, std=module.width**-0.5)


def precision(device: torch.device, amp: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the model's training precision); fp32 on CPU, where bf16 is slow and inexact."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
