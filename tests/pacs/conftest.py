"""A real Orthanc (with its DICOMweb plugin) for the PACS tests, on free loopback ports.

The ``orthanc`` fixture writes a JSON configuration into tmp_path (storage and index there,
remote access off, HTTP basic auth with one registered user), starts ``Orthanc``, waits
until ``/system`` answers and stops it afterwards. Tests that use it are skipped, with the
reason, when Orthanc or its DICOMweb plugin is not installed
(``apt-get install orthanc orthanc-dicomweb``).

Example::

    def test_x(orthanc):
        orthanc.upload(Path("examples/lidc-idri-0001"))
        orthanc.get("/studies")
"""
from __future__ import annotations

import glob
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, PASSWORD = "dicompipe", "test-only-password-5d1c"
PLUGIN_GLOBS = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
                "/usr/lib/orthanc/libOrthancDicomWeb.so*",
                "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).is_file()), None)


def dicomweb_plugin() -> str | None:
    return next((p for g in PLUGIN_GLOBS for p in sorted(glob.glob(g))), None)


@dataclass
class Orthanc:
    """A running Orthanc: its REST URL, DICOMweb root and DICOM port (AE ORTHANC)."""
    url: str
    dicom_port: int
    aet: str = "ORTHANC"

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def get(self, path: str, **kw):
        import requests
        r = requests.get(self.url + path, auth=(USER, PASSWORD), timeout=30, **kw)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def upload(self, folder: Path) -> int:
        """POST every file under ``folder`` to /instances; returns how many were stored."""
        import requests
        n = 0
        for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            r = requests.post(self.url + "/instances", data=f.read_bytes(),
                              auth=(USER, PASSWORD), timeout=30)
            if r.status_code == 200:
                n += 1
        return n

    def series_of(self, study_uid: str) -> list[dict]:
        """[{"modality", "description", "instances": [SOPInstanceUID...], "id"}] of a study."""
        found = self.post_json("/tools/lookup", study_uid)
        sid = next(x["ID"] for x in found if x["Type"] == "Study")
        out = []
        for s in self.get(f"/studies/{sid}/series"):
            inst = self.get(f"/series/{s['ID']}/instances")
            out.append({"id": s["ID"], "modality": s["MainDicomTags"].get("Modality"),
                        "uid": s["MainDicomTags"].get("SeriesInstanceUID"),
                        "instances": [i["MainDicomTags"]["SOPInstanceUID"] for i in inst],
                        "orthanc_ids": [i["ID"] for i in inst]})
        return out

    def post_json(self, path: str, body):
        import requests
        r = requests.post(self.url + path, data=body if isinstance(body, str) else json.dumps(body),
                          auth=(USER, PASSWORD), timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    exe, plugin = orthanc_binary(), dicomweb_plugin()
    if exe is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    pytest.importorskip("dicomweb_client", reason="needs dicompipe[pacs]")
    pytest.importorskip("pynetdicom", reason="needs dicompipe[pacs]")
    base = tmp_path_factory.mktemp("orthanc")
    http, dicom = free_port(), free_port()
    cfg = {"Name": "dicompipe-test", "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC",
           "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
           "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
           "RegisteredUsers": {USER: PASSWORD},
           "StorageDirectory": str(base / "storage"), "IndexDirectory": str(base / "index"),
           "DicomModalities": {}, "StableAge": 1, "ConcurrentJobs": 1}
    (base / "orthanc.json").write_text(json.dumps(cfg, indent=2))
    log = open(base / "orthanc.log", "wb")
    proc = subprocess.Popen([exe, str(base / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=base)
    server = Orthanc(f"http://127.0.0.1:{http}", dicom)
    try:
        _wait_for(server, proc, base / "orthanc.log")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _wait_for(server: Orthanc, proc, log_path: Path, timeout: float = 60.0) -> None:
    import requests
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
        try:
            if requests.get(server.url + "/system", auth=(USER, PASSWORD), timeout=2).ok:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"Orthanc did not answer /system within {timeout:.0f} s: "
                f"{log_path.read_text()[-2000:]}")
