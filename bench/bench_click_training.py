"""Benchmark: what click training buys, as JSON: held-out Dice of text prompts and after 1/3/5 simulated clicks.

Trains the same model twice with the bundle's train.json on synthetic CT phantoms, without (``--click_rounds 0``)
and with simulated box/click rounds, then runs evaluate.json's text and interactive protocols on held-out phantoms.

.venv/bin/python bench/bench_click_training.py --model_size tiny --steps 150     # CPU, a few minutes
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

from scripts.phantom import write_phantom  # noqa: E402

LABELS = {"1": "liver", "2": "spleen"}


def _bundle(configs: list[str], *args: str) -> None:
    files = str([str(REPO / "bundle" / "configs" / name) for name in configs])
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "bundle")}, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed")


def _datalist(root: Path, cases: int, held_out: int) -> Path:
    items = []
    for seed in range(cases + held_out):
        image, label = write_phantom(root, f"case{seed}", shape=(64, 64, 16), seed=seed)
        items.append({"image": str(image), "label": str(label)})
    path = root / "datalist.json"
    held = items[cases:]
    path.write_text(json.dumps({"training": items[:cases], "validation": held, "testing": held, "labels": LABELS}))
    return path


def run(args: argparse.Namespace, datalist: Path, work: Path, click_rounds: int) -> dict:
    run_dir, eval_dir = work / f"train_clicks{click_rounds}", work / f"eval_clicks{click_rounds}"
    start = time.perf_counter()
    common = ["--datalist", str(datalist), "--model_size", args.model_size, "--device_name", args.device]
    _bundle(
        ["train.json"],
        *common,
        "--output_dir",
        str(run_dir),
        "--ckpt_path",
        "random",
        "--mode",
        "full",
        "--max_steps",
        str(args.steps),
        "--batch_size",
        "2",
        "--val_every",
        "0",
        "--lr_backbone",
        "0.001",
        "--lr_decoder",
        "0.001",
        "--click_rounds",
        str(click_rounds),
    )
    train_s = time.perf_counter() - start
    evaluation = ["inference.json", "evaluate.json"]
    _bundle(evaluation, *common, "--output_dir", str(eval_dir), "--ckpt_path", str(run_dir / "model_final.pt"))
    summary = json.loads((eval_dir / "summary.json").read_text())
    with (eval_dir / "interactive.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    by_count: dict[int, list[float]] = {}
    for row in rows:
        by_count.setdefault(int(row["clicks"]), []).append(float(row["dice"]))
    interactive = {str(count): round(sum(v) / len(v), 4) for count, v in sorted(by_count.items())}
    return {
        "train_seconds": round(train_s, 1),
        "text_dice": {name: round(entry["dice_mean"], 4) for name, entry in summary.items() if "dice_mean" in entry},
        "mean_dice_after_clicks": interactive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        datalist = _datalist(Path(tmp), cases=3, held_out=2)
        results = {f"click_rounds_{rounds}": run(args, datalist, Path(tmp), rounds) for rounds in (0, 3)}
    cuda = torch.cuda.is_available() and args.device != "cpu"
    report = {
        "benchmark": "click training: held-out Dice by text prompt and after simulated clicks",
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
        "model_size": args.model_size,
        "mode": "full, random initial weights",
        "steps": args.steps,
        "data": "3 training and 2 held-out CT phantoms (64 x 64 x 16), liver and spleen",
        "results": results,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
