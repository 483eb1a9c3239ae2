"""Benchmark: one encoding per image (the modality's default preset) against one per label preset, as JSON.

Labels whose intensity presets differ each need their own encoding of the volume (issue #13, "fewer encodings").
This measures, on the demo model and held-out phantoms, what answering every label on the modality's default
encoding would change: Dice against the truth with each label's own preset and with the default one, and the
agreement of the two masks, plus the time of each way for the phantom's labels.

    .venv/bin/python bench/bench_presets.py --output bench/results/presets_demo_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_inference import device_name
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.checkpoint import load_checkpoint  # noqa: E402
from scripts.image_io import read_image  # noqa: E402
from scripts.inference import VolumeSegmenter  # noqa: E402
from scripts.label_numbering import vocabulary_values  # noqa: E402
from scripts.metrics import dice  # noqa: E402
from scripts.model_builder import build_medsam3  # noqa: E402
from scripts.orientation import SliceView  # noqa: E402
from scripts.phantom import PHANTOM_LABELS, write_phantom  # noqa: E402
from scripts.phantom_dataset import HELD_OUT_CASES  # noqa: E402
from scripts.predictor import Medsam3Predictor  # noqa: E402
from scripts.prompts import PromptSet  # noqa: E402
from scripts.vocabulary import load_vocabulary  # noqa: E402

DEMO = REPO / "bundle" / "models" / "demo_tiny.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", type=Path, default=DEMO)
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_medsam3("tiny", device=device)
    load_checkpoint(model, args.ckpt_path)
    vocabulary = load_vocabulary()
    segmenter = VolumeSegmenter(Medsam3Predictor(model), vocabulary)
    names = list(PHANTOM_LABELS.values())
    rows: dict[str, dict[str, list[float]]] = {name: {"own": [], "default": [], "agreement": []} for name in names}
    seconds = {"own": 0.0, "default": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for case, kind, orientation, seed in HELD_OUT_CASES:
            image_path, label_path = write_phantom(
                tmp, case, kind=kind, orientation=orientation, shape=(80, 72, 28), spacing=(1.6, 1.6, 3.5), seed=seed
            )
            image, truth = read_image(image_path), read_image(label_path).array
            start = time.perf_counter()
            own = segmenter.segment(image, PromptSet.create(texts=names)).label
            seconds["own"] += time.perf_counter() - start
            start = time.perf_counter()
            default = _on_default_encoding(segmenter, image, names)
            seconds["default"] += time.perf_counter() - start
            for value, name in PHANTOM_LABELS.items():
                rows[name]["own"].append(dice(own == value, truth == value))
                rows[name]["default"].append(dice(default == value, truth == value))
                rows[name]["agreement"].append(dice(own == value, default == value))
    emit(
        {
            "benchmark": "one encoding per modality against one per label preset (held-out phantoms)",
            "device": device_name(device),
            "model": str(args.ckpt_path.relative_to(REPO) if args.ckpt_path.is_relative_to(REPO) else args.ckpt_path),
            "cases": [case for case, *_ in HELD_OUT_CASES],
            "dice": {name: {k: round(float(np.mean(v)), 3) for k, v in row.items()} for name, row in rows.items()},
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "encodings_per_image": {"own": len({repr(vocabulary.preset_for(n, "CT")) for n in names}), "default": 1},
            "torch": torch.__version__,
        },
        args.output,
    )


def _on_default_encoding(segmenter: VolumeSegmenter, image, names: list[str]) -> np.ndarray:  # noqa: ANN001
    """Every label answered on the encoding free text gets: the modality's default preset."""
    encoding = segmenter.encode(image)
    values = vocabulary_values([segmenter.vocabulary.resolve(name) for name in names], segmenter.vocabulary)
    results = segmenter.predictor.segment_text(encoding, names)
    return SliceView.for_volume(image).from_view(segmenter.predictor.label_map(encoding, results, values))


if __name__ == "__main__":
    main()
