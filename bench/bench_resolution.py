"""Benchmark: image-encoder cost of one slice at 504 and 1008 px input (``--image_size``), as JSON (device named).

    .venv/bin/python bench/bench_resolution.py --output bench/results/resolution_base_cpu.json

Builds ``base`` (random weights: they do not change the cost) at each size and times the ViT trunk on one slice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from report import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.model_builder import build_medsam3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="base")
    parser.add_argument("--sizes", type=int, nargs="+", default=[504, 1008])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds = {}
    for size in args.sizes:
        trunk = build_medsam3(args.model_size, device=device, image_size=size).detector.backbone.vision_backbone.trunk
        x = torch.randn(1, 3, size, size, device=device)
        with torch.inference_mode():
            start = time.perf_counter()
            trunk(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[str(size)] = round(time.perf_counter() - start, 2)
        del trunk
    first, last = seconds[str(args.sizes[0])], seconds[str(args.sizes[-1])]
    emit(
        {
            "benchmark": "image encoder, one slice, by input size",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
            "model_size": args.model_size,
            "precision": "fp32",
            "seconds_per_slice": seconds,
            f"ratio_{args.sizes[-1]}_over_{args.sizes[0]}": round(last / first, 2),
        },
        args.output,
    )


if __name__ == "__main__":
    main()
