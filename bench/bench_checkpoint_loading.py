"""Benchmark: peak memory of loading a Medical SAM3 trainer checkpoint (model + optimizer state), as JSON.

Writes a synthetic file in the trainer's format (``{"model": ..., "optimizer": ..., "epoch", ...}``) whose optimizer
state weighs ``--optimizer_gb``, then loads it in fresh processes: with the bundle's loader (memory-mapped, model
tensors only) and with a plain ``torch.load``. Peak RSS is each loading process's own high-water mark (VmHWM).

.venv/bin/python bench/bench_checkpoint_loading.py --optimizer_gb 8 --output bench/results/checkpoint_loading_cpu.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.model_builder import build_medsam3  # noqa: E402

LOADERS = {
    "bundle (mmap, model tensors only)": "from scripts.checkpoint import read_state_dict; read_state_dict(PATH)",
    "torch.load (whole file)": "import torch; torch.load(PATH, map_location='cpu', weights_only=True)",
}


def _peak_rss_gib(code: str, path: Path) -> float:
    # VmHWM: this process's own high-water mark (ru_maxrss would include the writer's, inherited across fork)
    peak = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    script = f"{code.replace('PATH', repr(str(path)))}\n{peak}"
    env = {**os.environ, "PYTHONPATH": str(REPO / "bundle")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return round(int(out.stdout.strip().splitlines()[-1]) / 2**20, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--optimizer_gb", type=float, default=8.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    model = build_medsam3(args.model_size, device="cpu").state_dict()
    chunk = 2**28  # floats per optimizer tensor (1 GiB)
    count = int(args.optimizer_gb * 2**30 / 4 / chunk)
    optimizer = {"state": {i: {"exp_avg": torch.zeros(chunk)} for i in range(count)}, "param_groups": [{"lr": 1e-4}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save({"model": model, "optimizer": optimizer, "epoch": 1, "loss": 0.1, "steps": 10}, path)
        del optimizer
        size_gib = round(path.stat().st_size / 2**30, 2)
        peaks = {name: _peak_rss_gib(code, path) for name, code in LOADERS.items()}
    emit(
        {
            "benchmark": "peak RSS loading a trainer-format checkpoint",
            "device": f"CPU, {os.cpu_count()} cores",
            "model_size": args.model_size,
            "model_gib": round(sum(v.numel() * v.element_size() for v in model.values()) / 2**30, 3),
            "file_gib": size_gib,
            "peak_rss_gib": peaks,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
