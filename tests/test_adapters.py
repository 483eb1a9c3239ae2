"""LoRA and MA-SAM 3D adapters on the tiny model: identity at start, trainable parts, small files, checkpoint keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from torch import nn

from scripts.adapters import (
    HEAD_PREFIXES,
    LoRALinear,
    SliceAdapter3D,
    adaptation_state_dict,
    apply_3d_adapters,
    apply_lora,
    configure_adaptation,
    freeze_for_mode,
    image_encoder,
    is_adaptation_key,
    load_adaptation,
)
from scripts.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from scripts.encoding_cache import EncodingCache
from scripts.image_io import read_image
from scripts.inference import VolumeSegmenter
from scripts.network import MedSam3
from scripts.orientation import SliceView
from scripts.phantom import write_phantom
from scripts.predictor import Medsam3Predictor
from scripts.vocabulary import load_vocabulary

TRUNK = "detector.backbone.vision_backbone.trunk"
ADAPTED_MODES = ("lora", "adapter3d")
# Tiny ViT: depth 2, dim 48, MLP 96. LoRA r=8 on qkv, proj, fc1, fc2: 8 * (4 * 48 + 3 * 48 + 2 * (48 + 96)) = 4608
# parameters a block; 3D adapter, bottleneck 32, kernel (3, 1, 1): 2 * 48 + (48 * 32 + 32) + (3 * 32 + 32)
# + (32 * 48 + 48) = 3376 a block.
TINY_LORA_PARAMETERS = 2 * 4608
TINY_ADAPTER_PARAMETERS = 2 * 3376


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three consecutive 'slices' at the tiny model's input size (224), normalised like the predictor's."""
    return torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1


def encode(model: MedSam3, images: torch.Tensor) -> torch.Tensor:
    """The image encoder's final feature map, B x C x 16 x 16."""
    with torch.no_grad():
        return image_encoder(model)(images)[-1]


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Give every adaptation parameter random values, so LoRA and the adapters stop being the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_adaptation_key(name):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def adapted_model(mode: str, seed: int = 0, **options: object) -> MedSam3:
    model = tiny_model(seed)
    configure_adaptation(model, mode, **options)
    return model


@pytest.mark.parametrize("mode", ADAPTED_MODES)
def test_adaptation_starts_as_identity_and_changes_outputs_once_trained(mode: str, images: torch.Tensor) -> None:
    base = encode(tiny_model(), images)
    model = adapted_model(mode)
    assert torch.equal(encode(model, images), base)  # LoRA B = 0 and adapter up-projection = 0
    perturb(model)
    assert not torch.allclose(encode(model, images), base, atol=1e-3)


@pytest.mark.parametrize(
    ("mode", "count"),
    [
        ("lora", TINY_LORA_PARAMETERS),
        ("adapter3d", TINY_LORA_PARAMETERS + TINY_ADAPTER_PARAMETERS),
        ("full", None),
    ],
)
def test_only_the_mode_parameters_train_and_get_gradients(mode: str, count: int | None, images: torch.Tensor) -> None:
    model = adapted_model(mode)
    trainable = configure_adaptation(tiny_model(), mode)  # the same names on a second model
    assert trainable == [name for name, p in model.named_parameters() if p.requires_grad]
    parameters = dict(model.named_parameters())
    if mode == "full":
        assert len(trainable) == len(parameters)
    else:
        assert sum(parameters[name].numel() for name in trainable) == count
        assert all(is_adaptation_key(name) and name.startswith(f"{TRUNK}.blocks.") for name in trainable)
        assert (mode == "adapter3d") == any(".adapter3d." in name for name in trainable)
    perturb(model)  # non-zero B and up-projections: every adaptation parameter gets a non-zero gradient
    model.train()  # the ViT's training path: activation checkpointing and drop-path
    torch.manual_seed(0)
    image_encoder(model)(images)[-1].square().mean().backward()
    with_grad = {name for name, p in parameters.items() if p.grad is not None}
    assert with_grad <= set(trainable)
    if mode == "full":
        assert with_grad == {name for name in trainable if name.startswith(f"{TRUNK}.")}
    else:
        assert with_grad == set(trainable)
        assert all(parameters[name].grad.abs().sum() > 0 for name in trainable)


def test_apply_to_chosen_blocks_and_targets(images: torch.Tensor) -> None:
    model = tiny_model()
    lora = apply_lora(model, rank=4, targets=("attn.qkv",), blocks=[1])
    assert lora == [f"{TRUNK}.blocks.1.attn.qkv.lora_A", f"{TRUNK}.blocks.1.attn.qkv.lora_B"]
    adapters = apply_3d_adapters(model, bottleneck=8, kernel=(3, 3, 3), blocks=[0])
    assert adapters and all(name.startswith(f"{TRUNK}.blocks.0.adapter3d.") for name in adapters)
    trunk = image_encoder(model)
    assert isinstance(trunk.blocks[0].attn.qkv, nn.Linear) and isinstance(trunk.blocks[1].attn.qkv, LoRALinear)
    assert not hasattr(trunk.blocks[1], "adapter3d")
    assert sorted(freeze_for_mode(model, "adapter3d")) == sorted(lora + adapters)
    perturb(model)
    assert encode(model, images).shape == encode(tiny_model(), images).shape


def test_adaptation_files_are_small(tmp_path: Path) -> None:
    model = adapted_model("adapter3d")
    adaptation = adaptation_state_dict(model)
    assert set(adaptation) == {name for name, p in model.named_parameters() if p.requires_grad}
    full = model.state_dict()

    def size(state: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in state.values())

    # Tiny: 16k of 2.5M parameters (0.6%). Base (ViT dim 1024, MLP 4736, 32 blocks): LoRA r=8 adds
    # 32 * 8 * (4 * 1024 + 3 * 1024 + 2 * (1024 + 4736)) = 4.52M parameters and the 3D adapters (bottleneck 32)
    # 32 * 68768 = 2.20M, 6.7M in all against 860M, i.e. 0.8% of the full checkpoint.
    assert size(adaptation) < 0.01 * size(full)
    small = save_checkpoint(model, tmp_path / "adapter.pt", state_dict=adaptation, mode="adapter3d")
    large = save_checkpoint(model, tmp_path / "full.pt")
    assert small.stat().st_size < 0.02 * large.stat().st_size
    assert set(read_state_dict(small)) == set(adaptation)


@pytest.mark.parametrize("mode", ADAPTED_MODES)
def test_saved_adaptation_reloads_onto_a_fresh_base(mode: str, tmp_path: Path, images: torch.Tensor) -> None:
    model = adapted_model(mode)
    perturb(model)
    expected = encode(model, images)
    path = save_checkpoint(model, tmp_path / "adapter.pt", state_dict=adaptation_state_dict(model))
    fresh = adapted_model(mode)
    load_adaptation(fresh, read_state_dict(path))
    assert torch.equal(encode(fresh, images), expected)


def test_load_adaptation_names_bad_keys() -> None:
    state = adaptation_state_dict(adapted_model("adapter3d"))
    model = adapted_model("adapter3d")
    qkv_a = f"{TRUNK}.blocks.0.attn.qkv.lora_A"
    with pytest.raises(ValueError, match=r"unexpected keys .*attn\.qkv\.weight"):
        load_adaptation(model, {**state, f"{TRUNK}.blocks.0.attn.qkv.weight": torch.zeros(144, 48)})
    with pytest.raises(ValueError, match=rf"missing keys: {qkv_a}"):
        load_adaptation(model, {k: v for k, v in state.items() if k != qkv_a})
    load_adaptation(model, {qkv_a: state[qkv_a]}, strict=False)
    with pytest.raises(ValueError, match=r"shape mismatches: .*lora_A \(4, 48\) \(model: \(8, 48\)\)"):
        load_adaptation(model, adaptation_state_dict(adapted_model("lora", rank=4)), strict=False)
    with pytest.raises(ValueError, match="unexpected keys .*adapter3d"):
        load_adaptation(adapted_model("lora"), state)
    with pytest.raises(ValueError, match="no LoRA or 3D adapter parameters"):
        load_adaptation(tiny_model(), state)


def test_base_checkpoint_keys_fit_an_adapted_model(tmp_path: Path, images: torch.Tensor) -> None:
    base = tiny_model(seed=1)
    path = save_checkpoint(base, tmp_path / "base.pt")
    model = adapted_model("adapter3d", seed=0)
    assert not any(is_adaptation_key(key) for key in base.state_dict())
    assert set(model.state_dict()) - set(adaptation_state_dict(model)) == set(base.state_dict())
    result = model.load_state_dict(read_state_dict(path), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == set(adaptation_state_dict(model))
    assert torch.equal(encode(model, images), encode(base, images))


def test_load_checkpoint_loads_a_base_checkpoint_into_an_adapted_model(tmp_path: Path, images: torch.Tensor) -> None:
    base = tiny_model(seed=1)
    path = save_checkpoint(base, tmp_path / "base.pt")
    model = adapted_model("adapter3d", seed=0)
    load_checkpoint(model, path)
    assert torch.equal(encode(model, images), encode(base, images))


def test_slice_adapter_mixes_neighbouring_slices_only() -> None:
    adapter = SliceAdapter3D(16, bottleneck=8, kernel=(3, 1, 1))
    x = torch.randn(4, 5, 6, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adapter(x), x)  # zero up-projection: the identity
    torch.manual_seed(0)
    nn.init.normal_(adapter.up.weight, std=0.1)
    changed = x.clone()
    changed[0] = -changed[0]  # (a constant shift would vanish in the adapter's LayerNorm)
    before, after = adapter(x), adapter(changed)
    assert after.shape == x.shape
    assert not torch.allclose(before[1], after[1])  # slice 0 reaches slice 1 through the convolution
    assert torch.equal(before[2:], after[2:])  # but no further with a depth-3 kernel
    assert SliceAdapter3D(16, bottleneck=8, kernel=(3, 3, 3))(x).shape == x.shape


def test_adapted_encoder_mixes_slices_where_the_base_encoder_does_not(images: torch.Tensor) -> None:
    changed = images.clone()
    changed[0] = -changed[0]
    base = tiny_model()
    assert torch.equal(encode(base, images)[1:], encode(base, changed)[1:])  # each slice is encoded on its own
    model = adapted_model("adapter3d")
    perturb(model)
    assert not torch.allclose(encode(model, images)[1], encode(model, changed)[1], atol=1e-4)


def test_one_batch_encoded_alone_gives_its_slices_the_whole_volumes_features(tmp_path: Path) -> None:
    """Clicks without text name their structure on the clicked slice in every intensity preset, encoding only the
    batch of slices holding it (``VolumeSegmenter._slice_encoding``): its features must be the whole volume's, also
    when 3D adapters mix the slices of a batch."""
    image = read_image(write_phantom(tmp_path, shape=(24, 20, 11), spacing=(1.5, 1.5, 3.0))[0])
    view = SliceView.for_volume(image)
    preset = load_vocabulary().preset_for("vertebrae", "CT")
    model = adapted_model("adapter3d")
    perturb(model)
    segmenter = VolumeSegmenter(Medsam3Predictor(model, batch_size=4), load_vocabulary())
    whole = segmenter.predictor.encode(segmenter._slices(image, view, preset))
    for index in (0, 5, 10):  # the first batch, a middle one, the last and shorter one
        alone, local = segmenter._slice_encoding(image, view, preset, index, {})
        assert alone.num_slices == (3 if index == 10 else 4) and local == index % 4
        torch.testing.assert_close(alone.trunk[local], whole.trunk[index], rtol=0, atol=1e-5)
    shifted = segmenter.predictor.encode(segmenter._slices(image, view, preset)[1:6])  # another batch: other features
    assert not torch.allclose(shifted.trunk[4], whole.trunk[5], atol=1e-4)
    server = VolumeSegmenter(segmenter.predictor, load_vocabulary(), cache=EncodingCache(2**26))
    first, _ = server._slice_encoding(image, view, preset, 5, {})
    assert server._slice_encoding(image, view, preset, 6, {})[0] is first  # the session's next click: from the cache


def test_bad_input_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="Unknown adaptation mode 'bogus'; valid modes: full, lora, adapter3d"):
        configure_adaptation(model, "bogus")
    with pytest.raises(ValueError, match="valid modes: full, lora, adapter3d"):
        freeze_for_mode(model, "bogus")
    with pytest.raises(ValueError, match=r"nothing to train: apply it first with configure_adaptation"):
        freeze_for_mode(model, "lora")
    with pytest.raises(ValueError, match=r"no layer 'attn\.nope'"):
        apply_lora(model, targets=("attn.qkv", "attn.nope"))
    assert not any(isinstance(module, LoRALinear) for module in model.modules())  # a bad target changes nothing
    with pytest.raises(ValueError, match=r"block indices in 0\.\.1"):
        apply_3d_adapters(model, blocks=[2])
    apply_lora(model)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        apply_lora(model)
    with pytest.raises(ValueError, match="nothing to train"):
        freeze_for_mode(model, "adapter3d")  # needs the 3D adapters, not only LoRA
    apply_3d_adapters(model)
    with pytest.raises(ValueError, match="already have a 3D adapter"):
        apply_3d_adapters(model, blocks=[0])
    with pytest.raises(ValueError, match="three odd sizes"):
        SliceAdapter3D(16, kernel=(2, 1, 1))
    with pytest.raises(ValueError, match="B x H x W x C"):
        SliceAdapter3D(16)(torch.zeros(2, 10, 16))
    with pytest.raises(ValueError, match="rank >= 1"):
        LoRALinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="no image encoder"):
        apply_lora(nn.Linear(4, 4))


def test_heads_train_and_save_with_the_adapters(tmp_path: Path) -> None:
    """heads=True (train.json's default) also trains the decoder and heads, and saves and reloads them."""
    model = adapted_model("lora", heads=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {prefix for prefix in HEAD_PREFIXES if any(n.startswith(prefix) for n in trainable)} == set(HEAD_PREFIXES)
    assert not any(
        n.startswith((f"{TRUNK}.", "detector.backbone.language_backbone")) and "lora_" not in n for n in trainable
    )
    state = adaptation_state_dict(model)
    assert set(trainable) <= set(state) and model.adaptation["heads"] is True
    head = next(key for key in state if key.startswith("tracker.sam_mask_decoder."))
    path = save_checkpoint(model, tmp_path / "adapter.pt", state_dict={**state, head: state[head] + 1.0})
    fresh = adapted_model("lora", heads=True)
    load_adaptation(fresh, read_state_dict(path))
    torch.testing.assert_close(fresh.state_dict()[head], state[head] + 1.0)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_adaptation(adapted_model("lora"), read_state_dict(path))  # adapters only: the heads are not its to load
