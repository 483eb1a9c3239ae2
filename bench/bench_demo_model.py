"""Benchmark: the demo model's Dice against clicks on held-out phantoms, as shipped and after lora / adapter3d tuning.

Runs evaluate.json (text Dice, then the interactive protocol: clicks refining the text result, and clicks alone) on
held-out phantoms (seeds the demo model never saw, non-RAS orientations, anisotropic voxels), for the shipped demo
model and for the same model fine-tuned by train.json in ``lora`` and ``adapter3d`` mode on a few other phantoms.

.venv/bin/python bench/bench_demo_model.py --steps 60 --output bench/results/demo_model_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.phantom_dataset import write_held_out_dataset, write_phantom_dataset  # noqa: E402

DEMO = REPO / "bundle" / "models" / "demo_tiny.pt"


def _bundle(configs: list[str], *args: str) -> float:
    files = str([str(REPO / "bundle" / "configs" / name) for name in configs])
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "bundle")}, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed")
    return time.perf_counter() - start


def _curve(eval_dir: Path) -> dict[str, float]:
    with (eval_dir / "interactive.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_count: dict[int, list[float]] = {}
    for row in rows:
        by_count.setdefault(int(row["clicks"]), []).append(float(row["dice"]))
    return {str(count): round(sum(v) / len(v), 4) for count, v in sorted(by_count.items())}


def evaluate(datalist: Path, work: Path, name: str, *weights: str) -> dict:
    configs = ["inference.json", "demo.json", "evaluate.json"]
    common = ["--datalist", str(datalist), *weights]
    _bundle(configs, *common, "--output_dir", str(work / name))
    summary = json.loads((work / name / "summary.json").read_text())
    _bundle(configs, *common, "--output_dir", str(work / f"{name}_alone"), "--interactive_text", "false")
    return {
        "text_dice": {label: round(entry["dice_mean"], 4) for label, entry in summary.items()},
        "dice_after_clicks_with_text": _curve(work / name),
        "dice_after_clicks_alone": _curve(work / f"{name}_alone"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per adapter mode")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datalist = write_held_out_dataset(work / "held_out")
        results["demo"] = evaluate(datalist, work, "demo")
        tuning = write_phantom_dataset(work / "tuning", cases=4, validation=0, first_seed=2000)
        for mode in ("lora", "adapter3d"):
            seconds = _bundle(
                ["train.json"],
                "--datalist", tuning, "--output_dir", str(work / mode), "--model_size", "tiny",
                "--ckpt_path", str(DEMO), "--mode", mode, "--max_steps", str(args.steps), "--val_every", "0",
            )  # fmt: skip
            adapter = ["--adapter_path", str(work / mode / "model_final.pt")]
            results[mode] = {"train_seconds": round(seconds, 1), **evaluate(datalist, work, mode, *adapter)}
    report = {
        "benchmark": "demo model: held-out Dice by text prompt and after simulated clicks",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "model": "bundle/models/demo_tiny.pt (tiny)",
        "held_out": "3 phantoms (2 CT, 1 MR; LPS, PSR, ILA; 80 x 72 x 28 at 1.6 x 1.6 x 3.5 mm; seeds 11-13)",
        "fine_tuning": f"train.json defaults, {args.steps} steps on 4 other phantoms (seeds 2000-2003)",
        "results": results,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
