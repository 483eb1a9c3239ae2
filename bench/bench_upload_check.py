"""Benchmark: what reading an uploaded image before it joins the datastore adds to ``PUT /datastore/image``, as JSON.

Writes CT-sized NIfTI files (int16, gzip) and times the app's check (``lib.datastore.check_image_file``: the whole
image read, as inference will read it) against the atomic copy every upload already makes.

.venv/bin/python bench/bench_upload_check.py --output bench/results/upload_check_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))
sys.path.insert(0, str(REPO / "monailabel_app"))

from lib.datastore import check_image_file  # noqa: E402
from lib.safe_paths import atomic_copy  # noqa: E402


def _seconds(action, argument: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action(argument)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for slices in args.slices:
            path = Path(tmp) / f"ct_{slices}.nii.gz"
            smooth = rng.normal(0, 1, (512, 512, 1)).cumsum(0).astype(np.float32)  # compresses like a CT, not noise
            volume = (smooth * 40 + rng.normal(0, 20, (512, 512, slices))).clip(-1024, 3000).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 1.5, 1.0])), path)
            rows.append(
                {
                    "shape": [512, 512, slices],
                    "file_mb": round(path.stat().st_size / 2**20, 1),
                    "check_s": _seconds(lambda source: check_image_file(source, None), str(path), args.repeats),
                    "copy_s": _seconds(lambda source: atomic_copy(source, f"{tmp}/c.nii.gz"), str(path), args.repeats),
                }
            )
    emit({"benchmark": "upload check", "device": f"CPU, {os.cpu_count()} cores", "images": rows}, args.output)


if __name__ == "__main__":
    main()
