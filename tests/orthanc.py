"""A real Orthanc PACS with its DICOMweb plugin, started on 127.0.0.1 for one test module and stopped after it.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``setup.sh`` installs them). Storage lives in the test's
temporary folder; HTTP basic authentication is on, so the app's PACS credentials are exercised too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from monailabel_server import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")
USER, PASSWORD = "medsam3", "pacs-secret"


@dataclass(frozen=True)
class Pacs:
    url: str  # Orthanc's REST root
    auth: tuple[str, str]

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, files: list[Path]) -> None:
        """Store Part-10 files through Orthanc's REST API (as a modality or a PACS import would)."""
        for path in files:
            answer = requests.post(f"{self.url}/instances", data=path.read_bytes(), auth=self.auth, timeout=30)
            answer.raise_for_status()

    def series(self, modality: str | None = None) -> list[dict]:
        """QIDO-RS series search, as DICOM JSON."""
        params = {"Modality": modality} if modality else {}
        answer = requests.get(f"{self.dicomweb}/series", params=params, auth=self.auth, timeout=30)
        answer.raise_for_status()
        return answer.json() if answer.content else []

    def instance_files(self, series_uid: str) -> list[bytes]:
        """The Part-10 bytes of every instance of a series (looked up by SeriesInstanceUID)."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}},
            auth=self.auth,
            timeout=30,
        ).json()
        return [requests.get(f"{self.url}/instances/{i}/file", auth=self.auth, timeout=30).content for i in found]


def available() -> bool:
    return Path(ORTHANC).exists() and (PLUGINS / "libOrthancDicomWeb.so").exists()


@contextmanager
def run_orthanc(folder: Path) -> Iterator[Pacs]:
    """Orthanc on free loopback ports, its database under ``folder``; killed (and waited for) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "MEDSAM3TEST",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "MEDSAM3TEST",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}", "Ssl": False},
        "HttpTimeout": 60,
        "StableAge": 1,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    pacs = Pacs(f"http://127.0.0.1:{http_port}", (USER, PASSWORD))
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({process.returncode}); see {folder / 'orthanc.log'}")
            try:
                if requests.get(f"{pacs.url}/system", auth=pacs.auth, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within 60 s; see {folder / 'orthanc.log'}")
            time.sleep(0.2)
        yield pacs
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
