"""The model factory: base has the released SAM3 layout, tiny is the same classes, small; CPU shims are scoped."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import tiny_model

from scripts.cpu_compat import device_fallbacks
from scripts.model_builder import build_medsam3
from scripts.model_sizes import MODEL_SIZES, bpe_vocabulary_path


@pytest.mark.slow
def test_base_has_the_released_sam3_checkpoint_layout() -> None:
    """Every key and shape of upstream's SAM3 video model (the layout of sam3.pt) exists in ours, and no other."""
    import sam3.model_builder as upstream
    from sam3.model.decoder import TransformerDecoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    pe_init, dec_init = PositionEmbeddingSine.__init__, TransformerDecoder.__init__

    def cpu_pe(self, *args, precompute_resolution=None, **kwargs):  # upstream precomputes on "cuda"
        pe_init(self, *args, precompute_resolution=None, **kwargs)

    def cpu_dec(self, *args, resolution=None, stride=None, **kwargs):
        dec_init(self, *args, resolution=None, stride=None, **kwargs)

    with (
        mock.patch.object(PositionEmbeddingSine, "__init__", cpu_pe),
        mock.patch.object(TransformerDecoder, "__init__", cpu_dec),
    ):
        reference = upstream.build_sam3_video_model(
            bpe_path=str(bpe_vocabulary_path()), load_from_HF=False, device="cpu"
        )
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    del reference
    ours = build_medsam3("base", device="cpu")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert 855e6 < sum(p.numel() for p in ours.parameters()) < 865e6


def test_tiny_is_deterministic_per_seed() -> None:
    a, b, c = (build_medsam3("tiny", device="cpu", seed=s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())  # nothing left torch.empty


def test_tiny_forward_shapes() -> None:
    model = tiny_model()
    size = MODEL_SIZES["tiny"]
    with torch.inference_mode(), device_fallbacks(torch.device("cpu")):
        out = model(torch.zeros(2, 3, size.image_size, size.image_size), ["liver", "spleen", "aorta"])
    assert out["pred_logits"].shape == (6, size.num_queries, 1)  # (prompt, image) pairs x queries
    assert out["pred_masks"].shape == (6, size.num_queries, 64, 64) and out["presence_logit_dec"].shape == (6, 1)


def test_unknown_size() -> None:
    with pytest.raises(ValueError, match=r"Unknown model_size 'large'; choose one of \['base', 'tiny'\]"):
        build_medsam3("large")


def test_bpe_vocabulary_comes_from_open_clip() -> None:
    path = bpe_vocabulary_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and "open_clip" in str(path)


def test_cpu_fallbacks_are_scoped() -> None:
    tensor = torch.zeros(2)
    with device_fallbacks(torch.device("cpu")):
        assert tensor.cuda() is tensor and tensor.pin_memory() is tensor
    assert torch.Tensor.cuda is not None and tensor.pin_memory is not None
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            tensor.cuda()  # outside the context the real method is back


def test_moving_devices_refreshes_caches() -> None:
    model = tiny_model()
    assert model.detector.device.type == "cpu"  # Sam3Image caches its device on first use
    model.to("cpu")
    assert model.detector._device is None  # forgotten on every move, so a later .to("cuda") is seen
    rope = next(m for m in model.modules() if type(m).__name__ == "RoPEAttention")
    assert rope.freqs_cis.device == rope.q_proj.weight.device
