"""Benchmark: training throughput (samples/s) and peak memory per adaptation mode, as JSON (device named).

.venv/bin/python bench/bench_training.py --model_size tiny --steps 20          # CPU
.venv/bin/python bench/bench_training.py --model_size base --steps 20         # GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import emit
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.adapters import configure_adaptation  # noqa: E402
from scripts.click_training import ClickSimulation  # noqa: E402
from scripts.model_builder import build_medsam3  # noqa: E402
from scripts.phantom import write_phantom  # noqa: E402
from scripts.training import PromptStep, param_groups  # noqa: E402
from scripts.training_data import SlicePromptDataset, label_prompts  # noqa: E402
from scripts.vocabulary import load_vocabulary  # noqa: E402

LABELS = {1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}


class _Engine:
    """The attributes PromptStep reads from an ignite engine, without the engine's loop."""

    def __init__(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.network, self.optimizer = network, optimizer
        self.state = type("State", (), {"metrics": {}, "device": network.device})()


def run_mode(mode: str, args: argparse.Namespace, items: list[dict], device: torch.device) -> dict:
    model = build_medsam3(args.model_size, device=device)
    configure_adaptation(model, mode, heads=bool(args.train_heads))
    # as train.json: the tracker's clips when it trains, else single slices (3 for the 3D adapters)
    clip = args.tracking_clip if args.click_rounds > 0 else (3 if mode == "adapter3d" else 1)
    vocabulary = load_vocabulary()
    samples = args.steps * args.batch_size
    dataset = SlicePromptDataset(
        items, LABELS, vocabulary, model.image_size, samples, clip=clip, anchor_first=args.click_rounds > 0
    )
    loader = DataLoader(dataset, batch_size=args.batch_size)
    engine = _Engine(model, torch.optim.AdamW(param_groups(model)))
    clicks = ClickSimulation(rounds=args.click_rounds) if args.click_rounds > 0 else None
    step = PromptStep(
        label_prompts(LABELS, vocabulary), clicks=clicks, activation_checkpointing=bool(args.activation_checkpointing)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = iter(loader)
    step(engine, next(batches))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    count = 0
    for batch in batches:
        step(engine, batch)
        count += batch["image"].shape[0] * clip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "slices_per_s": round(count / seconds, 2),
        "prompts_per_slice": len(LABELS),
        "trainable_parameters_m": round(trainable / 1e6, 3),
        "peak_memory_gib": round(peak, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--click_rounds", type=int, default=3, help="simulated box/click rounds (0: text only)")
    parser.add_argument("--tracking_clip", type=int, default=8, help="slices per tracker clip (train.json default)")
    parser.add_argument(
        "--train_heads", type=int, default=1, help="adapter modes also train the heads (1, as train.json)"
    )
    parser.add_argument(
        "--activation_checkpointing", type=int, default=1, help="recompute activations in backward (1, as train.json)"
    )
    parser.add_argument("--modes", nargs="+", default=["full", "lora", "adapter3d"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for seed in range(2):
            image, label = write_phantom(tmp, f"case{seed}", shape=(128, 128, 32), seed=seed)
            items.append({"image": str(image), "label": str(label)})
        modes = {mode: run_mode(mode, args, items, device) for mode in args.modes}
    report = {
        "benchmark": "training throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        "model_size": args.model_size,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "batch_size": args.batch_size,
        "click_rounds": args.click_rounds,
        "train_heads": bool(args.train_heads),
        "activation_checkpointing": bool(args.activation_checkpointing),
        "modes": modes,
        "peak_memory_kind": "GPU allocated" if device.type == "cuda" else "process max RSS (cumulative over modes)",
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
