"""Benchmark: cost of text-prompted inference against the number of labels (1, 4, 16, all), as JSON (device named).

    .venv/bin/python bench/bench_labels.py --output bench/results/labels_tiny_cpu.json              # CPU, demo model
    .venv/bin/python bench/bench_labels.py --model_size base --ckpt_path <model.pt> --slices 300 --size 512 \
        --batch_size 32                                                                           # GPU

Each count segments the same phantom with that many vocabulary labels in one request (labels sharing an intensity
preset share an encoding and run through the heads together). Times are the result's own stage timings; ratios are
to the 1-label time, so a busy machine's slowness cancels out. ``--presence_stride k`` times the coarse presence
pass (``scripts/presence_pass.py``). Trained weights matter: the mask head runs only for
(label, slice) pairs the presence score lets through, and random weights let through an arbitrary share.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from bench_inference import device_name
from report import emit

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "bundle" / "models" / "demo_tiny.pt"
sys.path.insert(0, str(REPO / "bundle"))

from scripts.checkpoint import load_checkpoint  # noqa: E402
from scripts.image_io import read_image  # noqa: E402
from scripts.inference import VolumeSegmenter  # noqa: E402
from scripts.model_builder import build_medsam3  # noqa: E402
from scripts.phantom import write_phantom  # noqa: E402
from scripts.predictor import Medsam3Predictor  # noqa: E402
from scripts.prompts import PromptSet  # noqa: E402
from scripts.vocabulary import load_vocabulary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--ckpt_path", default=str(DEMO), help="weights (default: the demo model), or 'random'")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=96, help="in-plane size of the synthetic CT")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--presence_stride", type=int, default=1, help="coarse presence pass every k slices")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 0], help="0: the whole vocabulary")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocabulary = load_vocabulary()
    model = build_medsam3(args.model_size, device=device)
    if args.ckpt_path != "random":
        load_checkpoint(model, args.ckpt_path)
    segmenter = VolumeSegmenter(
        Medsam3Predictor(model, batch_size=args.batch_size, presence_stride=args.presence_stride), vocabulary
    )
    names = [entry.name for entry in vocabulary]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        image_path, _ = write_phantom(tmp, "bench", shape=(args.size, args.size, args.slices), spacing=(1.5, 1.5, 2.5))
        volume = read_image(image_path)
        segmenter.segment(volume, PromptSet.create(texts=names[:1]))  # warm-up
        for count in args.counts:
            labels = names[: count or len(names)]
            segmenter.predictor._text_cache.clear()  # every count pays for its text encoder too
            result = segmenter.segment(volume, PromptSet.create(texts=labels))
            stages = result.timings
            rows[str(len(labels))] = {
                "total_s": round(sum(stages.values()), 3),
                "image_encoder_s": round(stages.get("image_encoder", 0.0), 3),
                "heads_s": round(stages.get("heads", 0.0), 3),
                "encodings": len({repr(sorted(vocabulary.preset_for(n, "CT").items())) for n in labels}),
            }
    first = rows[next(iter(rows))]["total_s"]
    for row in rows.values():
        row["ratio_to_1_label"] = round(row["total_s"] / first, 2)
    emit(
        {
            "benchmark": "text-prompted inference against the number of labels",
            "device": device_name(device),
            "model_size": args.model_size,
            "weights": Path(args.ckpt_path).name,
            "volume": [args.size, args.size, args.slices],
            "batch_size": args.batch_size,
            "presence_stride": args.presence_stride,
            "labels": rows,
            "torch": torch.__version__,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
