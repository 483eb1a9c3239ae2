"""Benchmark: the app on a PACS, as JSON: what fetching a series, writing a DICOM SEG and storing one cost.

Starts Orthanc with DICOMweb on 127.0.0.1 (``tests/orthanc.py``), stores a CT phantom series of ``--shape``, starts
the app on it with the demo model and times, from the client: the first inference on the series (fetch with
WADO-RS, series check, conversion, inference), the same request again (served from the cache), the same result as a
DICOM SEG (``result_extension .dcm``) and a submitted label (SEG written and stored with STOW-RS).

    .venv/bin/python bench/bench_pacs.py --shape 256 256 96 --output bench/results/pacs_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import requests
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bundle"), str(REPO / "tests")]

from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel_server import free_port, server_process  # noqa: E402
from orthanc import USER, run_orthanc  # noqa: E402

from scripts.phantom import write_phantom  # noqa: E402


def timed(work, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = work(*args, **kwargs)
    return round(time.perf_counter() - start, 3), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 96))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, run_orthanc(Path(tmp) / "orthanc") as pacs:
        root = Path(tmp)
        os.environ["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(root / "cache")
        folder, label = write_phantom(root / "phantom", "ct", fmt="dicom", shape=tuple(args.shape), seed=11)
        files = sorted(folder.iterdir())
        series_mb = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        upload_s, _ = timed(pacs.upload, files)
        series = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
        password = root / "password"
        password.write_text(pacs.auth[1])
        conf = ["--conf", "model_size", "tiny", "--conf", "ckpt_path", str(REPO / "bundle" / "models" / "demo_tiny.pt")]
        conf += ["--conf", "dicomweb_user", USER, "--conf", "dicomweb_password_file", str(password)]
        for url, _ in server_process(root, pacs.dicomweb, free_port(), *conf):
            client = MONAILabelClient(url)
            params = {"labels": "liver", "result_extension": ".nrrd"}
            first_s, (_, first) = timed(client.infer, "medsam3_auto", series, params)
            again_s, (_, again) = timed(client.infer, "medsam3_auto", series, params)
            seg_s, _ = timed(client.infer, "medsam3_auto", series, {**params, "result_extension": ".dcm"})
            info = {
                "label_info": [
                    {"name": name} for name in ("liver", "spleen", "right kidney", "left kidney", "vertebrae", "aorta")
                ]
            }
            store_s, _ = timed(client.save_label, series, str(label), tag="final", params=info)
            stored = len(pacs.series("SEG"))
            alive = requests.get(f"{url}/info/", timeout=30).status_code == 200

    report = {
        "benchmark": "MONAI Label app on a DICOMweb PACS (Orthanc 1.10, DICOMweb plugin 1.7, loopback)",
        "device": f"CPU, {os.cpu_count()} cores",
        "model": "tiny, bundle/models/demo_tiny.pt",
        "series": {
            "shape": list(args.shape),
            "files": len(files),
            "mb": series_mb,
        },
        "seconds": {
            "store_series_in_pacs": upload_s,
            "first_infer_with_fetch": first_s,
            "first_infer_server_total": first["timings"]["server_total"],
            "second_infer_cached": again_s,
            "second_infer_server_total": again["timings"]["server_total"],
            "infer_as_dicom_seg": seg_s,
            "save_label_as_seg_in_pacs": store_s,
        },
        "segs_in_pacs": stored,
        "alive_after": alive,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
