"""Benchmark: per-stage time and peak memory of text-prompted 3D inference, as JSON (device named).

    .venv/bin/python bench/bench_inference.py --model_size tiny --slices 64 --size 256          # CPU
    .venv/bin/python bench/bench_inference.py --model_size base --slices 300 --size 512 --batch_size 32  # GPU

Weights are random (they do not change the cost). Stages: I/O (read + write), preprocess, image encoder,
text encoder, heads, 3D assembly; plus the bare ViT trunk on the same batches, for comparison with the
upstream backbone, and the end-to-end time.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.image_io import read_image  # noqa: E402
from scripts.image_writing import write_label  # noqa: E402
from scripts.inference import VolumeSegmenter  # noqa: E402
from scripts.model_builder import build_medsam3  # noqa: E402
from scripts.phantom import write_phantom  # noqa: E402
from scripts.predictor import Medsam3Predictor  # noqa: E402
from scripts.prompts import PromptSet  # noqa: E402
from scripts.vocabulary import load_vocabulary  # noqa: E402


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def bare_trunk_seconds(model, slices: int, batch: int, device: torch.device, amp: bool) -> float:
    """The ViT trunk alone on random batches: the floor our image encoder is compared with."""
    size = model.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    trunk = model.detector.backbone.vision_backbone.trunk
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        trunk(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(0, slices, batch):
            trunk(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="in-plane size of the synthetic CT")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompts", nargs="+", default=["liver"])
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args()

    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    model = build_medsam3(args.model_size, device=device)
    predictor = Medsam3Predictor(model, batch_size=args.batch_size, score_threshold=0.5)
    segmenter = VolumeSegmenter(predictor, load_vocabulary())
    prompts = PromptSet.create(texts=args.prompts)

    with tempfile.TemporaryDirectory() as tmp:
        image_path, _ = write_phantom(tmp, "bench", shape=(args.size, args.size, args.slices), spacing=(0.8, 0.8, 1.5))
        segmenter.segment(read_image(image_path), prompts)  # warm-up: kernels, caches
        predictor._text_cache.clear()  # measure the text encoder too
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        volume = read_image(image_path)
        read_s = time.perf_counter() - start
        result = segmenter.segment(volume, prompts)
        write_start = time.perf_counter()
        write_label(result.label, volume, Path(tmp) / "out.nii.gz")
        write_s = time.perf_counter() - write_start
        total = time.perf_counter() - start

    stages = dict(result.timings)
    stages["io_read"], stages["io_write"] = round(read_s, 4), round(write_s, 4)
    bare = bare_trunk_seconds(model, args.slices, args.batch_size, device, predictor.amp)
    report = {
        "benchmark": "text-prompted 3D inference",
        "device": device_name(device),
        "model_size": args.model_size,
        "precision": "bf16 autocast" if predictor.amp else "fp32",
        "volume": [args.size, args.size, args.slices],
        "batch_size": args.batch_size,
        "prompts": args.prompts,
        "stages_s": stages,
        "image_encoder_ms_per_slice": round(1000 * stages["image_encoder"] / args.slices, 3),
        "bare_trunk_ms_per_slice": round(1000 * bare / args.slices, 3),
        "end_to_end_s": round(total, 3),
        "peak_memory_gib": round(
            torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            3,
        ),
        "peak_memory_kind": "GPU allocated" if device.type == "cuda" else "process max RSS",
        "torch": torch.__version__,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
