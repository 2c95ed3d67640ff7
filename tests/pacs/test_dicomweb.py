"""dicompipe pull against a real Orthanc: upload the LIDC example, pull -> analyse -> push,
then read back from Orthanc what was stored and check the SR's references (and, with
dicom3tools, that the SR and SC validate)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import PASSWORD, USER
from synth import tree_hash

from dicompipe.cli import main
from dicompipe.errors import PacsError
from dicompipe.pacs import dicomweb

pytestmark = pytest.mark.pacs
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lidc-idri-0001"
STUDY = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
CT_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


def _sr_image_refs(ds) -> set[str]:
    """Every SOP Instance UID an SR references: evidence and IMAGE content items."""
    refs = {r.ReferencedSOPInstanceUID for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}

    def walk(items):
        for it in items:
            for r in it.get("ReferencedSOPSequence", []):
                refs.add(r.ReferencedSOPInstanceUID)
            walk(it.get("ContentSequence", []))
    walk(ds.get("ContentSequence", []))
    return refs


def _dciodvfy_errors(path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]


@pytest.fixture(scope="module")
def uploaded(orthanc):
    t = time.perf_counter()
    n = orthanc.upload(EXAMPLE)
    print(f"upload: {n} instances in {time.perf_counter() - t:.2f} s")
    assert n == 16
    return orthanc


def test_pull_analyse_push_round_trip(uploaded, tmp_path, monkeypatch, capsys):
    orthanc = uploaded
    monkeypatch.setenv(dicomweb.AUTH_ENV, f"{USER}:{PASSWORD}")
    before = tree_hash(EXAMPLE)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    rc = main(["pull", "--dicomweb", orthanc.dicomweb, "--study", STUDY, "--organ", "lung",
               "--out", str(tmp_path / "runs"), "--format", "json", "--push", "--auth", "basic",
               "--no-history", "--backend", "onnx", "--tmp", str(tmp)])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert "QIDO-RS: 1 series" in out and "WADO-RS: 16 instances" in out and "STOW-RS:" in out
    assert USER not in out and PASSWORD not in out
    assert list(tmp.iterdir()) == []                           # the download is gone
    assert tree_hash(EXAMPLE) == before
    run_dir = next((tmp_path / "runs").iterdir())
    local_sr = pydicom.dcmread(run_dir / "sr.dcm")
    n_sc = len(list((run_dir / "sc").glob("*.dcm")))

    series = {s["modality"]: s for s in orthanc.series_of(STUDY)}
    assert set(series) == {"CT", "SR", "OT"} or set(series) == {"CT", "SR", "SC"}
    ct = series["CT"]
    assert ct["uid"] == CT_SERIES and len(ct["instances"]) == 16
    sr = series["SR"]
    assert sr["instances"] == [local_sr.SOPInstanceUID]
    sc = next(s for m, s in series.items() if m not in ("CT", "SR"))
    assert len(sc["instances"]) == n_sc >= 1

    # the SR as Orthanc serves it references CT instances of this study, the key images
    stored = tmp_path / "back"
    stored.mkdir()
    (stored / "sr.dcm").write_bytes(orthanc.get(f"/instances/{sr['orthanc_ids'][0]}/file"))
    back = pydicom.dcmread(stored / "sr.dcm")
    assert back.SOPClassUID == SR_CLASS and back.StudyInstanceUID == STUDY
    refs = _sr_image_refs(back)
    assert refs and refs <= set(ct["instances"])
    assert refs == _sr_image_refs(local_sr)
    for k, oid in enumerate(sc["orthanc_ids"]):
        (stored / f"sc{k}.dcm").write_bytes(orthanc.get(f"/instances/{oid}/file"))
        im = pydicom.dcmread(stored / f"sc{k}.dcm")
        assert im.SOPClassUID == SC_CLASS and im.StudyInstanceUID == STUDY
        assert {r.ReferencedSOPInstanceUID for r in im.SourceImageSequence} <= refs
    if shutil.which("dciodvfy"):
        for f in sorted(stored.iterdir()):
            assert _dciodvfy_errors(f) == [], f.name


def test_refusals_are_clear(uploaded, tmp_path):
    orthanc = uploaded
    env = {dicomweb.AUTH_ENV: f"{USER}:wrong-password"}
    with pytest.raises(PacsError, match="HTTP 401"):
        dicomweb.pull(orthanc.dicomweb, STUDY, out=tmp_path, auth="basic", env=env)
    env = {dicomweb.AUTH_ENV: f"{USER}:{PASSWORD}"}
    with pytest.raises(PacsError, match="no series on the server"):
        dicomweb.pull(orthanc.dicomweb, "1.2.3.4", out=tmp_path, auth="basic", env=env)
    with pytest.raises(PacsError, match="is not in study"):
        dicomweb.pull(orthanc.dicomweb, STUDY, series="1.2.3", out=tmp_path, auth="basic", env=env)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with pytest.raises(PacsError, match="larger than the download limit"):
        dicomweb.pull(orthanc.dicomweb, STUDY, out=tmp_path / "runs", auth="basic", env=env,
                      max_download=200_000, tmp_dir=tmp, history=False)
    assert list(tmp.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_credentials_never_come_from_the_command_line(tmp_path):
    with pytest.raises(PacsError, match="needs the credential"):
        dicomweb.read_credentials("bearer", env={})
    with pytest.raises(PacsError, match="not a user:password"):
        dicomweb.read_credentials("basic", env={dicomweb.AUTH_ENV: "just-a-token"})
    f = tmp_path / "token"
    f.write_text("# my token\n  abc.def.ghi  \n")
    f.chmod(0o600)
    cred = dicomweb.read_credentials("bearer", auth_file=f)
    assert cred.kind == "bearer" and cred.secret == "abc.def.ghi" and "abc" not in repr(cred)
    with pytest.raises(PacsError, match="holds a user name or password"):
        dicomweb.check_url("https://alice:pw@pacs.example/dicom-web")
    with pytest.raises(PacsError, match="not an http"):
        dicomweb.check_url("ftp://pacs.example")
    with pytest.raises(SystemExit):            # there is no option that takes a secret
        main(["pull", "--dicomweb", "https://x", "--study", "1.2", "--out", "o", "--token", "t"])


def test_tls_is_verified(tmp_path):
    pytest.importorskip("dicomweb_client")
    dw = dicomweb.client("https://127.0.0.1:9/dicom-web")
    assert dw._session.verify is True
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert dicomweb.client("https://127.0.0.1:9/dicom-web", ca_bundle=ca)._session.verify == str(ca)
    with pytest.raises(PacsError, match="is not a file"):
        dicomweb.client("https://127.0.0.1:9/dicom-web", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(PacsError, match="cannot connect"):
        dicomweb.pull("https://127.0.0.1:9/dicom-web", "1.2.3", out=tmp_path)
