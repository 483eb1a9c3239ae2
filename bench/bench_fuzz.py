"""Benchmark: the app under generated hostile requests, as JSON: status histogram, 5xx count, server memory.

Starts the app on 127.0.0.1 (tiny model, random weights) over three phantom CTs, sends ``--requests`` generated
malformed requests (``tests/fuzz_requests.py``: the suite's fuzz test sends a few hundred of the same kind), then a
few large requests (a 256 x 256 x 128 upload, a header claiming 30000^3 voxels), and reads the server's resident
memory (VmRSS) at steady state, after the fuzzing, after the large requests and after they settle.

    .venv/bin/python bench/bench_fuzz.py --requests 1500 --output bench/results/fuzz_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import requests
from report import emit

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bundle"), str(REPO / "tests")]

from fuzz_requests import fuzz_requests, nifti_bytes  # noqa: E402
from monailabel_server import server_process, studies  # noqa: E402

from scripts.phantom import write_phantom  # noqa: E402

IMAGES = ["ct_ras", "ct_lps", "ct_psr"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = studies(root)
        big, _ = write_phantom(root / "big", "big", shape=(256, 256, 128), seed=5)
        conf = ["--conf", "model_size", "tiny", "--conf", "checkpoint", "random"]
        port = int(os.environ.get("PORT", "0")) or __import__("monailabel_server").free_port()
        for url, process in server_process(root, folder, port, *conf):
            pid = process.pid
            for _ in range(3):  # steady state: the model loaded, one inference of each task done
                for model in ("medsam3_auto", "medsam3_clicks"):
                    requests.post(f"{url}/infer/{model}?image=ct_ras", data={"params": '{"foreground": [[5, 5, 5]]}'})
            memory = {"steady_mb": rss_mb(pid)}
            histogram: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            server_errors = []
            start = time.perf_counter()
            for request in fuzz_requests(IMAGES, args.requests, args.seed):
                response = requests.request(request.method, url + request.path, timeout=120, **request.kwargs)
                histogram[request.kind][response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append([request.kind, request.method, request.path, response.text[:200]])
            fuzz_s = time.perf_counter() - start
            memory["after_fuzz_mb"] = rss_mb(pid)
            for _ in range(3):
                requests.post(
                    f"{url}/infer/medsam3_auto",
                    data={"params": '{"labels": "liver,spleen"}'},
                    files={"file": ("big.nii.gz", big.read_bytes())},
                    timeout=600,
                )
                bomb = nifti_bytes((2, 2, 2), claim=(30000, 30000, 30000))
                requests.post(f"{url}/infer/medsam3_auto", data={"params": "{}"}, files={"file": ("b.nii.gz", bomb)})
            memory["after_large_mb"] = rss_mb(pid)
            time.sleep(10)
            memory["settled_mb"] = rss_mb(pid)
            alive = requests.get(f"{url}/info/", timeout=30).status_code == 200

    report = {
        "benchmark": "MONAI Label app under generated hostile requests",
        "device": f"CPU, {os.cpu_count()} cores",
        "requests": args.requests,
        "seconds": round(fuzz_s, 1),
        "server_errors_5xx": len(server_errors),
        "first_5xx": server_errors[:10],
        "alive_after": alive,
        "status_by_kind": {kind: dict(sorted(counts.items())) for kind, counts in sorted(histogram.items())},
        "server_memory": memory,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
