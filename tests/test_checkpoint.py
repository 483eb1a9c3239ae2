"""Checkpoint formats: each one reloads to identical outputs; broken files are refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import model_outputs, tiny_model

from scripts.checkpoint import (
    CheckpointError,
    checkpoint_image_size,
    load_checkpoint,
    load_network,
    read_state_dict,
    save_checkpoint,
)
from scripts.model_builder import build_medsam3


@pytest.fixture(scope="module")
def source():
    """A tiny model with weights different from the default seed, and its outputs."""
    model = tiny_model(seed=7)
    return model, model_outputs(model)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sam3_format_round_trip(tmp_path: Path, source) -> None:
    model, expected = source
    path = tmp_path / "sam3.pt"
    torch.save(model.state_dict(), path)  # detector.* and tracker.* keys, as the released sam3.pt
    target = tiny_model(seed=0)
    assert not np.array_equal(model_outputs(target)["text"], expected["text"])
    report = load_checkpoint(target, path)
    assert report.interactive and not report.unexpected
    _assert_same(model_outputs(target), expected)


@pytest.mark.parametrize(("wrapped", "prefixed"), [(True, False), (False, False), (False, True)])
def test_medical_sam3_detector_only(tmp_path: Path, source, wrapped: bool, prefixed: bool) -> None:
    """Detector-only files: under ``model`` or bare, with the ``detector.`` prefix or without."""
    model, expected = source
    detector = {
        k if prefixed else k.removeprefix("detector."): v
        for k, v in model.state_dict().items()
        if k.startswith("detector.") and "sam2_convs" not in k  # Medical SAM3 ships no tracker neck
    }
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": detector} if wrapped else detector, path)
    target = tiny_model(seed=0)
    report = load_checkpoint(target, path)
    assert not report.interactive
    load_network(target, str(path))
    assert target.interactive is False
    np.testing.assert_array_equal(model_outputs(target, with_clicks=False)["text"], expected["text"])
    with pytest.raises(ValueError, match="need the SAM3 tracker weights"):
        model_outputs(target)


def test_medical_sam3_with_sam3_tracker(tmp_path: Path, source) -> None:
    model, expected = source
    state = model.state_dict()
    detector = {f"module.{k.removeprefix('detector.')}": v for k, v in state.items() if k.startswith("detector.")}
    detector = {k: v for k, v in detector.items() if "sam2_convs" not in k}
    torch.save({"model": detector}, tmp_path / "medsam3.pt")
    # The SAM3 checkpoint's detector differs (other weights): only its tracker part may be used.
    other = tiny_model(seed=3).state_dict()
    sam3 = {
        k: (state[k] if k.startswith(("tracker.", "detector.backbone.vision_backbone.sam2_convs")) else other[k])
        for k in other
    }
    torch.save(sam3, tmp_path / "sam3.pt")
    target = tiny_model(seed=0)
    report = load_checkpoint(target, tmp_path / "medsam3.pt", tracker_path=tmp_path / "sam3.pt")
    assert report.interactive
    _assert_same(model_outputs(target), expected)


def test_project_format(tmp_path: Path, source) -> None:
    model, expected = source
    path = save_checkpoint(model, tmp_path / "model.pt", note="test")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "medsam3" and raw["model_size"] == "tiny"
    assert raw["meta"] == {"image_size": 224, "note": "test"}
    target = tiny_model(seed=0)
    load_checkpoint(target, path)
    _assert_same(model_outputs(target), expected)


def test_missing_detector_weights_refused(tmp_path: Path, source) -> None:
    state = dict(source[0].state_dict())
    state.pop("detector.transformer.decoder.bbox_embed.layers.0.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"lacks 1 detector weights \(detector.transformer.decoder"):
        load_checkpoint(tiny_model(), tmp_path / "partial.pt")


def test_incomplete_tracker_refused(tmp_path: Path, source) -> None:
    state = {k: v for k, v in source[0].state_dict().items() if "sam_mask_decoder" not in k}
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="Tracker weights are missing or incomplete"):
        load_checkpoint(tiny_model(), tmp_path / "partial.pt")


def test_require_tracker(tmp_path: Path, source) -> None:
    state = {k: v for k, v in source[0].state_dict().items() if k.startswith("detector.") and "sam2_convs" not in k}
    torch.save(state, tmp_path / "det.pt")
    with pytest.raises(CheckpointError, match="give the SAM3 checkpoint"):
        load_checkpoint(tiny_model(), tmp_path / "det.pt", require_tracker=True)


def test_non_finite_refused(tmp_path: Path, source) -> None:
    state = dict(source[0].state_dict())
    key = "detector.dot_prod_scoring.prompt_proj.weight"
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    target = tiny_model(seed=0)
    before = target.state_dict()[key].clone()
    with pytest.raises(CheckpointError, match=f"NaN/Inf values in 1 tensors, e.g. \\['{key}'\\]"):
        load_checkpoint(target, tmp_path / "nan.pt")
    torch.testing.assert_close(target.state_dict()[key], before)  # the model is untouched


def test_shape_mismatch_refused(tmp_path: Path, source) -> None:
    state = dict(source[0].state_dict())
    state["detector.transformer.decoder.query_embed.weight"] = torch.zeros(200, 256)
    torch.save(state, tmp_path / "base_like.pt")
    with pytest.raises(
        CheckpointError, match=r"do not fit model_size 'tiny'.*query_embed.weight has shape \(200, 256\)"
    ):
        load_checkpoint(tiny_model(), tmp_path / "base_like.pt")


def test_unexpected_keys_reported(tmp_path: Path, source) -> None:
    state = dict(source[0].state_dict())
    state["detector.something_new.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pt")
    report = load_checkpoint(tiny_model(), tmp_path / "extra.pt")
    assert report.unexpected == ["detector.something_new.weight"]
    assert "1 unexpected keys ignored" in report.summary()


def test_unreadable_files(tmp_path: Path, source) -> None:
    with pytest.raises(CheckpointError, match="Checkpoint file not found"):
        read_state_dict(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save(source[0].state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="Cannot read checkpoint .*truncated.pt"):
        read_state_dict(truncated)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_missing_weights_message_says_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="large_files.yml.*bundle/models/model.pt"):
        load_network(tiny_model(), str(tmp_path / "model.pt"))


def test_medical_sam3_trainer_format_loads_without_its_optimizer(tmp_path: Path, source) -> None:
    """Medical SAM3's trainer saves the whole model (detector + tracker) next to the optimizer state and counters."""
    model, expected = source
    optimizer = {"state": {i: {"exp_avg": torch.randn(64, 64)} for i in range(3)}, "param_groups": [{"lr": 1e-4}]}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer, "epoch": 3, "loss": 0.2, "steps": 900}, path)
    target = tiny_model(seed=0)
    report = load_checkpoint(target, path)
    assert report.interactive and not report.unexpected  # the file's own, fine-tuned tracker is used
    _assert_same(model_outputs(target), expected)


def test_position_tables_are_recomputed_so_other_resolutions_load(tmp_path: Path, source) -> None:
    """A file saved at half the input size (as Medical SAM3's 504-px 3D model) loads; its size is read back."""
    half = build_medsam3("tiny", device="cpu", seed=7, image_size=112)
    rope = "detector.backbone.vision_backbone.trunk.blocks.1.attn.freqs_cis"  # the global-attention block
    assert half.state_dict()[rope].shape[0] == (112 // 14) ** 2 != tiny_model().state_dict()[rope].shape[0]
    torch.save({"model": half.state_dict()}, tmp_path / "half.pt")
    assert checkpoint_image_size(tmp_path / "half.pt") == 112
    target = tiny_model(seed=0)
    tables = {k: v.clone() for k, v in target.state_dict().items() if k.endswith("freqs_cis")}
    load_checkpoint(target, tmp_path / "half.pt")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in tables.items())  # the model's own, not the file's
    weights = {k: v for k, v in half.state_dict().items() if not k.endswith("freqs_cis")}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in weights.items())
    again = build_medsam3("tiny", device="cpu", image_size=checkpoint_image_size(tmp_path / "half.pt"))
    load_checkpoint(again, tmp_path / "half.pt")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in half.state_dict().items())  # bit for bit
    assert checkpoint_image_size(save_checkpoint(half, tmp_path / "ours.pt")) == 112  # recorded in our format
    assert checkpoint_image_size(tmp_path / "missing.pt") is None and checkpoint_image_size("random") is None
    with pytest.raises(ValueError, match="image_size must be a multiple of the patch size 14"):
        build_medsam3("tiny", device="cpu", image_size=100)


def test_corrupted_text_encoder_is_taken_from_sam3(tmp_path: Path, source, caplog) -> None:
    model, expected = source
    state = dict(model.state_dict())
    key = "detector.backbone.language_backbone.encoder.transformer.resblocks.0.mlp.c_fc.weight"
    assert key in state
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save({"model": state}, tmp_path / "medical.pt")
    torch.save(model.state_dict(), tmp_path / "sam3.pt")
    with pytest.raises(CheckpointError, match="text-encoder tensors.*give SAM3's sam3.pt as --text_encoder_ckpt_path"):
        load_checkpoint(tiny_model(), tmp_path / "medical.pt")
    for option in ({"text_encoder_path": tmp_path / "sam3.pt"}, {"tracker_path": tmp_path / "sam3.pt"}):
        target = tiny_model(seed=0)
        with caplog.at_level("WARNING"):
            report = load_checkpoint(target, tmp_path / "medical.pt", **option)
        assert report.text_encoder_replaced == [key] and key in caplog.text
        _assert_same(model_outputs(target), expected)
    elsewhere = dict(model.state_dict())
    other = "detector.dot_prod_scoring.prompt_proj.weight"
    elsewhere[other] = torch.full_like(elsewhere[other], float("inf"))
    torch.save(elsewhere, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"NaN/Inf values in 1 tensors, e.g. \\['{other}'\\]"):
        load_checkpoint(tiny_model(), tmp_path / "bad.pt", text_encoder_path=tmp_path / "sam3.pt")
