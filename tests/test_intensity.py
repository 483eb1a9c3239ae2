"""Intensity presets map any volume to float32 in [0, 1]; bad presets and values get clear handling."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from monai.transforms import ScaleIntensityRangePercentiles

from scripts.image_io import ImageVolume
from scripts.intensity import apply_preset, check_preset, guess_modality
from scripts.orientation import SliceView
from scripts.phantom import make_ct_phantom, make_mr_phantom
from scripts.slices import DISPLAY_PRESET, prepare_slices, preset_for
from scripts.vocabulary import load_vocabulary

ABDOMEN = {"type": "ct_window", "center": 40, "width": 400}
MR = {"type": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True}


def test_ct_window_clips_and_scales() -> None:
    hu = np.array([[-1000, -160, 40], [140, 240, 3000]], dtype=np.int16)
    scaled = apply_preset(hu, ABDOMEN)
    assert scaled.dtype == np.float32 and scaled.shape == hu.shape
    np.testing.assert_allclose(scaled, [[0.0, 0.0, 0.5], [0.75, 1.0, 1.0]], atol=1e-6)


def test_percentile_matches_monai_on_the_whole_volume() -> None:
    volume = np.random.default_rng(0).gamma(2.0, 50.0, (8, 16, 16)).astype(np.float32)
    preset = {"type": "percentile", "lower": 0.5, "upper": 99.5}
    expected = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(volume)
    np.testing.assert_allclose(apply_preset(volume, preset), np.asarray(expected), atol=1e-6)
    low, high = np.percentile(volume, [0.5, 99.5])
    middle = np.array([low, (low + high) / 2, high], dtype=np.float32)
    np.testing.assert_allclose(
        apply_preset(np.concatenate([volume.ravel(), middle]), preset)[-3:], [0, 0.5, 1], atol=1e-3
    )


def test_percentile_over_nonzero_voxels_ignores_background() -> None:
    foreground = np.linspace(100.0, 200.0, 1000, dtype=np.float32)
    volume = np.concatenate([np.zeros(3000, dtype=np.float32), foreground])  # 75 % background
    scaled = apply_preset(volume, MR)
    low, high = np.percentile(foreground, [0.5, 99.5])
    np.testing.assert_allclose(scaled[3000:], np.clip((foreground - low) / (high - low), 0, 1), atol=1e-6)
    assert np.all(scaled[:3000] == 0)
    whole = apply_preset(volume, {**MR, "nonzero": False})
    assert whole[3000] > 0.4  # the background's percentile is 0, so the darkest foreground is mid-grey


def test_mr_phantom_fills_the_range() -> None:
    image, _ = make_mr_phantom((24, 24, 12))
    scaled = apply_preset(image, MR)
    assert scaled.min() == 0.0 and scaled.max() == 1.0 and 0.2 < float(scaled[image > 0].mean()) < 0.8


@pytest.mark.parametrize("preset", [MR, {**MR, "nonzero": False}])
@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_volumes_have_no_contrast_to_keep(preset: dict[str, Any], value: float) -> None:
    scaled = apply_preset(np.full((4, 5, 6), value, dtype=np.float32), preset)
    assert scaled.shape == (4, 5, 6) and scaled.dtype == np.float32 and np.all(scaled == 0)
    assert np.all(apply_preset(np.zeros((4, 5, 6)), ABDOMEN) == np.float32(0.4))  # a window needs no contrast


def test_non_finite_values_are_replaced(caplog: pytest.LogCaptureFixture) -> None:
    volume = np.array([[np.nan, -50.0], [np.inf, 150.0], [-np.inf, 50.0]], dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="scripts.intensity"):
        scaled = apply_preset(volume, {"type": "ct_window", "center": 50, "width": 200})
    assert "Replacing 3 non-finite voxels (NaN or Inf) with -50" in caplog.text
    np.testing.assert_allclose(scaled, [[0.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    percentile = apply_preset(volume, MR)
    assert np.all(np.isfinite(percentile)) and percentile.min() == 0 and percentile.max() == 1


def test_all_non_finite_volume_becomes_zeros(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scripts.intensity"):
        scaled = apply_preset(np.full((3, 3), np.nan), MR)
    assert "Replacing 9 non-finite voxels (NaN or Inf) with 0" in caplog.text
    assert np.all(scaled == 0)


def test_torch_tensors_are_accepted() -> None:
    tensor = torch.tensor([[-160.0, 40.0, 240.0]])
    scaled = apply_preset(tensor, ABDOMEN)
    assert isinstance(scaled, np.ndarray) and scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [[0.0, 0.5, 1.0]], atol=1e-6)
    assert guess_modality(tensor - 1000) == "CT"


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("ct_abdomen", "An intensity preset is a mapping with a 'type', got 'ct_abdomen'"),
        ({"type": "zscore"}, "Unknown intensity preset type 'zscore' .*; use 'ct_window' or 'percentile'"),
        ({"center": 40, "width": 400}, "Unknown intensity preset type None"),
        ({"type": "ct_window", "width": 400}, "needs a finite number 'center'"),
        ({"type": "ct_window", "center": "40", "width": 400}, "needs a finite number 'center'"),
        ({"type": "ct_window", "center": float("nan"), "width": 400}, "needs a finite number 'center'"),
        ({"type": "ct_window", "center": True, "width": 400}, "needs a finite number 'center'"),
        ({"type": "ct_window", "center": 40, "width": 0}, "CT window width must be positive, got 0"),
        ({"type": "percentile", "lower": 99, "upper": 1}, "Percentiles must satisfy 0 <= lower < upper <= 100"),
        ({"type": "percentile", "lower": 1, "upper": 101}, "Percentiles must satisfy 0 <= lower < upper <= 100"),
        ({"type": "percentile", "lower": 1, "upper": 99, "nonzero": "yes"}, "'nonzero' must be true or false"),
    ],
)
def test_bad_presets_are_rejected(preset: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_preset(preset)
    with pytest.raises(ValueError, match=message):
        apply_preset(np.zeros((2, 2)), preset)


def test_empty_image_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"The image is empty \(shape \(0, 4\)\)"):
        apply_preset(np.zeros((0, 4)), ABDOMEN)
    with pytest.raises(ValueError, match="The image is empty"):
        guess_modality(np.zeros((0,)))


def test_guess_modality() -> None:
    assert guess_modality(make_ct_phantom((16, 16, 8))[0]) == "CT"
    assert guess_modality(make_mr_phantom((16, 16, 8))[0]) == "MR"
    assert guess_modality(np.array([-1024, 0, 3071], dtype=np.int16)) == "CT"
    assert guess_modality(np.array([-3024, -1000, 1500], dtype=np.int16)) == "CT"  # out-of-field padding
    assert guess_modality(np.array([np.nan, -1000.0, 40.0, np.inf])) == "CT"  # non-finite values are ignored
    assert guess_modality(np.array([-5.0, 0.0, 900.0])) == "MR"  # slightly negative after filtering
    assert guess_modality(np.array([0, 255], dtype=np.uint8)) == "MR"
    assert guess_modality(np.array([0.0, 1024.0, 4095.0])) == "MR"  # raw CT without its rescale intercept
    assert guess_modality(np.array([-1000.0, 70000.0])) == "MR"  # beyond the int16 range: not stored HU
    assert guess_modality(np.array([-1e6, 10.0])) == "MR"


def test_guess_modality_needs_finite_values() -> None:
    with pytest.raises(ValueError, match="Cannot guess the modality of an image without finite values"):
        guess_modality(np.array([np.nan, np.inf]))


def test_pictures_are_scaled_as_displayed(caplog: pytest.LogCaptureFixture) -> None:
    """8-bit pictures over 0..255 (as always), 16-bit RGB over 0..65535, float RGB over its own range, NaN replaced:
    before, everything was divided by 255, so a float picture in [0, 1] reached the model nearly black, and a NaN
    reached the encoder."""
    rgb = np.random.default_rng(0).random((6, 5, 3), dtype=np.float32)
    rgb[0, 0, 0] = np.nan
    cases = {
        "8-bit": ImageVolume.from_picture(np.array([[0, 51], [255, 102]], np.uint8)),
        "16-bit RGB": ImageVolume.from_picture(np.array([[[0, 65535, 13107]] * 2] * 2, np.uint16)),
        "float RGB": ImageVolume.from_picture(rgb),
    }
    for name, picture in cases.items():
        assert preset_for(picture, load_vocabulary(), None, "MR") == DISPLAY_PRESET, name
        with caplog.at_level(logging.WARNING):
            slices = prepare_slices(picture, SliceView.for_volume(picture), DISPLAY_PRESET)
        assert slices.dtype == np.float32 and np.isfinite(slices).all() and slices.min() == 0 and slices.max() == 1
    eight_bit = cases["8-bit"]
    expected = np.array([[0, 51], [255, 102]], np.float32) / 255
    np.testing.assert_array_equal(
        prepare_slices(eight_bit, SliceView.for_volume(eight_bit), DISPLAY_PRESET)[0], expected
    )
    assert "Replacing 1 non-finite voxels" in caplog.text
