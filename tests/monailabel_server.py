"""A real MONAI Label server with the app on 127.0.0.1, over generated phantom studies (for end-to-end tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from scripts.phantom import write_phantom

REPO = Path(__file__).resolve().parents[1]
SHAPE = (40, 36, 12)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def studies(root: Path) -> Path:
    """Three phantom CTs (RAS, LPS and PSR orientations) in ``root/studies``; their labels in ``root/phantoms``."""
    folder = root / "studies"
    for name, code in (("ct_ras", "RAS"), ("ct_lps", "LPS"), ("ct_psr", "PSR")):
        image, label = write_phantom(
            root / "phantoms", name, orientation=code, shape=SHAPE, seed=len(name) + ord(code[0])
        )
        folder.mkdir(exist_ok=True)
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


def start_server(root: Path, *conf: str) -> Iterator[tuple[str, Path]]:
    """Yield (server URL, studies folder) of a server over :func:`studies` started with ``conf`` arguments."""
    folder = studies(root)
    for url in launch_server(root, folder, free_port(), *conf):
        yield url, folder


def launch_server(root: Path, folder: Path, port: int, *conf: str) -> Iterator[str]:
    """Yield the URL of a server over the studies ``folder`` (logging to ``root/server.log``); stop it afterwards."""
    for url, _ in server_process(root, folder, port, *conf):
        yield url


def server_temp(root: Path) -> Path:
    """The temporary folder of a server started in ``root`` (its ``TMPDIR``)."""
    return root / "tmp"


def server_process(root: Path, folder: Path, port: int, *conf: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`launch_server`, also yielding the server's process (for tests that kill it)."""
    temp = server_temp(root)
    temp.mkdir(exist_ok=True)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "TMPDIR": str(temp)}  # the server's temporary files, for tests to check
    args = ["start_server", "--app", str(REPO / "monailabel_app"), "--studies", str(folder)]
    args += ["--host", "127.0.0.1", "--port", str(port), *conf]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", *args], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                # 401: up, with auth_users; 502: up, its PACS down
                if requests.get(f"{url}/info/", timeout=5).status_code in (200, 401, 502):
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise RuntimeError("server did not start in time")
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
