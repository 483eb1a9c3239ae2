"""Benchmark: seconds per click request on the demo model, ``click_refinement`` ``tracker``, ``instances``, ``auto``,
and ``instances`` with demo.json's ``click_radius_mm``.

    .venv/bin/python bench/bench_clicks.py --output bench/results/clicks_demo_cpu.json

On each held-out phantom (the demo model never saw them), for each organ: the interactive protocol's first three
clicks, sent as three requests that carry all clicks so far (as Slicer sends them), with and without the organ's name
as text. The image encoding is computed once per phantom and reused, as the MONAI Label server's encoding cache does
for repeated clicks on one image, so the times are what a click costs after the first.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.checkpoint import load_network  # noqa: E402
from scripts.clicks import next_click  # noqa: E402
from scripts.encoding_cache import EncodingCache  # noqa: E402
from scripts.image_io import read_image  # noqa: E402
from scripts.inference import VolumeSegmenter  # noqa: E402
from scripts.model_builder import build_medsam3  # noqa: E402
from scripts.phantom_dataset import HELD_OUT_CASES, HELD_OUT_LABELS, write_held_out_dataset  # noqa: E402
from scripts.predictor import Medsam3Predictor  # noqa: E402
from scripts.prompts import PromptSet  # noqa: E402
from scripts.vocabulary import load_vocabulary  # noqa: E402

DEMO = REPO / "bundle" / "models" / "demo_tiny.pt"
DEMO_CONFIG = json.loads((REPO / "bundle" / "configs" / "demo.json").read_text())
OPTIONS = {key: DEMO_CONFIG[key] for key in ("score_threshold", "score_smoothing")}  # as demo.json
RADIUS = DEMO_CONFIG["click_radius_mm"]  # demo.json's: the image redraws the boundary near each click


def _requests(segmenter: VolumeSegmenter, folder: Path, with_text: bool) -> list[tuple[int, float]]:
    """``(click number, seconds)`` of each click request (three per organ and phantom)."""
    seconds = []
    for name, *_ in HELD_OUT_CASES:
        image = read_image(folder / f"{name}.nii.gz")
        reference = read_image(folder / f"{name}_label.nii.gz").array
        segmenter.segment(image, PromptSet.create(texts=["liver"]))  # fills the encoding cache
        for value, organ in HELD_OUT_LABELS.items():
            target, prediction, points, labels = reference == int(value), np.zeros(reference.shape, bool), [], []
            for count in range(1, 4):
                point, label = next_click(prediction, target, image.spacing)
                points.append(point.tolist())
                labels.append(label)
                prompts = PromptSet.create(texts=[organ] if with_text else None, points=points, point_labels=labels)
                start = time.perf_counter()
                prediction = segmenter.segment(image, prompts).label > 0
                seconds.append((count, time.perf_counter() - start))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    model = load_network(build_medsam3("tiny", device="cpu"), str(DEMO))
    vocabulary = load_vocabulary()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_held_out_dataset(folder)
        for mode, radius in (("tracker", 0.0), ("instances", 0.0), ("auto", 0.0), ("instances", RADIUS)):
            segmenter = VolumeSegmenter(
                Medsam3Predictor(model, **OPTIONS),
                vocabulary,
                cache=EncodingCache(2**30),
                click_refinement=mode,
                click_radius_mm=radius,
            )
            for with_text in (True, False):
                timed = _requests(segmenter, folder, with_text)
                seconds = [s for _, s in timed]
                redraw = f" + click_radius_mm {radius:g}" if radius else ""
                key = f"{mode}{redraw}, {'with text' if with_text else 'clicks alone'}"
                results[key] = {
                    "requests": len(seconds),
                    "median_s": round(statistics.median(seconds), 3),
                    "max_s": round(max(seconds), 3),
                    # a session's first request; clicks alone name the structure there, and later requests reuse it
                    "median_first_click_s": round(statistics.median(s for c, s in timed if c == 1), 3),
                    "median_later_clicks_s": round(statistics.median(s for c, s in timed if c > 1), 3),
                }
    emit(
        {
            "benchmark": "seconds per click request (encoding cached), demo model, held-out phantoms",
            "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
            "model": f"bundle/models/demo_tiny.pt (tiny), {OPTIONS}",
            "held_out": "3 phantoms, 80 x 72 x 28; 4 organs; the protocol's first 3 clicks",
            "results": results,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
