"""Benchmark: MONAI Label click latency (cache cold and warm) and an automatic multi-label request, as JSON.

Starts the app on 127.0.0.1 with a synthetic CT in its studies folder and talks to it with MONAILabelClient
(the Slicer plugin's client). Reports the server's own per-stage timings and the round trip.

    .venv/bin/python bench/bench_monailabel.py --model_size tiny --slices 64 --size 256        # CPU
    .venv/bin/python bench/bench_monailabel.py --model_size base --slices 300 --size 512       # GPU
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch
from monailabel.client import MONAILabelClient
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bundle"))

from scripts.phantom import write_phantom  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timed(client: MONAILabelClient, model: str, image: str, params: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    _, result = client.infer(model, image, params)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--checkpoint", default="random")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--auto_labels", default="liver,spleen,right kidney,left kidney,vertebrae,aorta")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        write_phantom(studies, "ct", shape=(args.size, args.size, args.slices), spacing=(0.8, 0.8, 1.5))
        (studies / "ct_label.nii.gz").unlink()
        port = _free_port()
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app")]
        command += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--conf", "model_size", args.model_size, "--conf", "checkpoint", args.checkpoint]
        server = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if requests.get(f"{url}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(1)
            client = MONAILabelClient(url, tmpdir=tmp)
            centre = [args.size // 2, args.size // 2, args.slices // 2]
            click = {"label": "liver", "foreground": [centre], "background": [], "result_extension": ".nrrd"}
            cold_s, cold = _timed(client, "medsam3_clicks", "ct", click)
            warm = [
                _timed(client, "medsam3_clicks", "ct", {**click, "background": [[2, 2, centre[2]]]})
                for _ in range(args.repeats)
            ]
            auto_s, auto = _timed(
                client, "medsam3_auto", "ct", {"labels": args.auto_labels, "result_extension": ".nrrd"}
            )
        finally:
            server.terminate()
            server.wait(timeout=60)

    warm_rt = [w[0] for w in warm]
    report = {
        "benchmark": "MONAI Label click and auto latency",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "model_size": args.model_size,
        "volume": [args.size, args.size, args.slices],
        "click_cold": {"round_trip_s": round(cold_s, 3), "server": cold["timings"], "cache": cold["encoding_cache"]},
        "click_warm": {
            "round_trip_p50_s": round(statistics.median(warm_rt), 3),
            "round_trip_max_s": round(max(warm_rt), 3),
            "server": warm[-1][1]["timings"],
            "cache": warm[-1][1]["encoding_cache"],
        },
        "auto": {"labels": args.auto_labels.split(","), "round_trip_s": round(auto_s, 3), "server": auto["timings"]},
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
