"""CUDA-only checks: bf16 autocast inference, and the same code path moving the model between devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_slices, tiny_model

from scripts.predictor import Medsam3Predictor

pytestmark = pytest.mark.gpu


def test_bf16_inference_matches_cpu_roughly() -> None:
    cpu = Medsam3Predictor(tiny_model(seed=4), score_threshold=0.0)
    gpu = Medsam3Predictor(tiny_model(seed=4).to("cuda"), score_threshold=0.0)
    assert gpu.amp and not cpu.amp
    slices = random_slices(4)
    a = cpu.segment_text(cpu.encode(slices), ["liver"])[0]
    b = gpu.segment_text(gpu.encode(slices), ["liver"])[0]
    assert gpu.encode(slices).trunk.dtype == torch.bfloat16
    np.testing.assert_allclose(a.scores.numpy(), b.scores.cpu().numpy(), atol=0.05)
    clicks = gpu.segment_clicks(gpu.encode(slices), np.array([[1, 5, 5]]), np.array([1]))
    assert clicks.logits.device.type == "cuda"
