"""Shared test utilities: the tiny model (real sam3 classes, small sizes) and fixed inputs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from scripts.model_builder import build_medsam3
from scripts.network import MedSam3
from scripts.predictor import Medsam3Predictor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DEMO_MODEL = REPO / "bundle" / "models" / "demo_tiny.pt"


def bundle_run(*args: str, config: str | list[str] = "inference.json") -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` with the bundle's configs (layered in order) and command-line overrides."""
    configs = [config] if isinstance(config, str) else config
    files = str([str(CONFIGS / c) for c in configs]) if len(configs) > 1 else str(CONFIGS / configs[0])
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@functools.lru_cache(maxsize=4)
def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    return build_medsam3("tiny", device="cpu", seed=seed).state_dict()


def tiny_model(seed: int = 0) -> MedSam3:
    """A fresh tiny model whose random weights depend only on ``seed`` (builds once per seed, then copies)."""
    model = build_medsam3("tiny", device="cpu", seed=None)
    model.load_state_dict(_tiny_state(seed))
    return model


def random_slices(num: int = 6, height: int = 40, width: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num, 3, height, width, generator=generator)


def model_outputs(model: MedSam3, with_clicks: bool = True) -> dict[str, np.ndarray]:
    """Text, box and click logits of ``model`` on fixed inputs, for comparing two models' weights."""
    predictor = Medsam3Predictor(model, batch_size=4, score_threshold=0.0)
    encoding = predictor.encode(random_slices())
    out = {"text": predictor.segment_text(encoding, ["liver", "spleen"])[0].logits.float().numpy()}
    if with_clicks:
        clicks = predictor.segment_clicks(encoding, np.array([[2, 10, 12]]), np.array([1]))
        out["clicks"] = clicks.logits.float().numpy()
    return out
