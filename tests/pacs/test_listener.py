"""dicompipe listen: a real pynetdicom SCU sends series to the listener; results come back
(and are forwarded to a real Orthanc); malformed input, a refused AE, raw garbage on the
port, a full queue, a crashing worker and SIGTERM are survived. Analyses use a tiny
untrained bundle (64 px) so that a series takes seconds."""
from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from conftest import free_port
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from synth import write_ct_series
from tiny_bundle import chest_phantom, make_bundle

from dicompipe import pipeline
from dicompipe.types import PreprocessSpec

pytest.importorskip("pynetdicom", reason="needs dicompipe[pacs]")
from pynetdicom import AE, _config  # noqa: E402
from pynetdicom.sop_class import CTImageStorage, Verification  # noqa: E402

from dicompipe.pacs.common import Peer  # noqa: E402
from dicompipe.pacs.listener import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Listener  # noqa: E402

pytestmark = pytest.mark.pacs
SPEC = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)], size=64,
                      slab_mm=5.0)
NAME, PID = "Doe^Jane", "MRN-777123"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "lung", organ="lung", spec=SPEC,
                       favour="malignant")


def make_study(folder: Path, n: int = 12) -> list[pydicom.Dataset]:
    """A small chest CT series with a new study, a patient name and ID (in memory)."""
    files = write_ct_series(folder, shape=(n, 48, 48), spacing=(0.8, 0.8, 2.5),
                            origin=(-19.0, -19.0, -100.0), study_uid=generate_uid(),
                            series_uid=generate_uid(), body_part="CHEST",
                            hu=chest_phantom((n, 48, 48), lung_z=(0.2, 1.0)))
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID = NAME, PID
        out.append(ds)
    return out


def send(datasets, port: int, calling: str = "TESTSCU") -> list[int | None]:
    """C-STORE ``datasets`` (or file paths) in one association; the status of each."""
    ae = AE(ae_title=calling)
    ae.dimse_timeout = ae.network_timeout = 300     # a loaded CI machine can be slow
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)   # as written
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMPIPE")
    if not assoc.is_established:
        return [None] * len(datasets)
    try:
        out = []
        for ds in datasets:
            st = assoc.send_c_store(ds)
            out.append(int(st.Status) if st and "Status" in st else None)
        return out
    finally:
        assoc.release()


def malformed_file(path: Path, template: pydicom.Dataset) -> Path:
    """Valid file meta, then a data set that cannot be decoded (a sequence of garbage)."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = template.SOPClassUID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    fm = pydicom.Dataset()
    fm.file_meta = meta
    fm.preamble = b"\0" * 128
    fm.SOPClassUID = template.SOPClassUID
    pydicom.dcmwrite(path, fm, enforce_file_format=True)
    with open(path, "ab") as f:                 # (0010,0010) SQ of undefined length: garbage
        f.write(b"\x10\x00\x10\x00SQ\x00\x00\xff\xff\xff\xff" + b"\x01\x02garbage" * 3)
    return path


def case_options(bundle, **kw):
    return {"formats": "json,dicom", "history": False, "model": str(bundle),
            "allow_untrained": True, "backend": "torch", "device": "cpu", **kw}


def _no_identifiers(text: str, uids) -> None:
    assert NAME not in text and "Doe" not in text and PID not in text
    for u in uids:
        assert u not in text


def test_three_studies_at_once_and_bad_input(bundle, orthanc, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dicompipe.pacs")
    studies = [make_study(tmp_path / f"st{k}") for k in range(3)]
    lst = Listener(aet="DICOMPIPE", port=0, out=tmp_path / "runs", organ="auto", settle_s=3.0,
                   forward=Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port),
                   allow_aet=["TESTSCU", "OTHER"],
                   case_options=case_options(bundle, deidentify=True)).start()
    port = lst.address[1]
    try:
        # a bad association first: raw garbage on the port, then an AE that is not allowed
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x01\x00garbage, not an A-ASSOCIATE-RQ" * 20)
        assert send(studies[0][:1], port, calling="INTRUDER") == [None]
        # a malformed instance and one without UIDs are refused, the listener goes on
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            bad = send([malformed_file(tmp_path / "bad.dcm", studies[0][0])], port)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        no_uid = copy.deepcopy(studies[0][0])
        del no_uid.SeriesInstanceUID
        assert bad == [CANNOT_UNDERSTAND] and send([no_uid], port) == [CANNOT_UNDERSTAND]
        # three studies at once, from two calling AEs
        statuses: dict[int, list] = {}
        threads = [threading.Thread(target=lambda k=k: statuses.__setitem__(
            k, send(studies[k], port, calling="TESTSCU" if k != 1 else "OTHER")))
            for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        sent_at = time.monotonic()
        assert all(s == [0] * 12 for s in statuses.values()), statuses
        outcomes = lst.wait(3, timeout=300)
        took = time.monotonic() - sent_at
    finally:
        lst.stop(timeout=120)
    print(f"3 studies: results {took:.1f} s after the last instance; "
          f"latencies {[o.latency_s for o in outcomes]}")
    assert len(outcomes) == 3 and all(o.error is None for o in outcomes), outcomes
    assert all(o.forwarded >= 2 and (o.run_dir / "sr.dcm").is_file() for o in outcomes)
    assert lst.refused["malformed"] == 2
    # each study now holds its SR and SC in Orthanc, de-identified (--deidentify)
    for st in studies:
        series = {s["modality"]: s for s in orthanc.series_of(st[0].StudyInstanceUID)}
        assert set(series) == {"SR", "OT"}, series          # the SR and the SC series
        back = pydicom.dcmread(BytesIO(orthanc.get(f"/instances/{series['SR']['orthanc_ids'][0]}/file")))
        refs = {r.ReferencedSOPInstanceUID for e in back.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
        assert refs and refs <= {ds.SOPInstanceUID for ds in st}
        assert str(back.PatientName) == "ANONYMOUS" and back.PatientID != PID
    sr = pydicom.dcmread(outcomes[0].run_dir / "sr.dcm")
    assert str(sr.PatientName) == "ANONYMOUS" and sr.PatientIdentityRemoved == "YES"
    # the spool is empty again; logs name no patient and no UID
    assert [p.name for p in lst.spool.iterdir()] == ["failed"]
    assert not any((lst.spool / "failed").iterdir())
    uids = {u for st in studies for u in (st[0].StudyInstanceUID, st[0].SeriesInstanceUID,
                                          st[0].SOPInstanceUID)}
    _no_identifiers(caplog.text, uids)
    assert "refused a malformed instance from TESTSCU: cannot decode it" in caplog.text
    assert "rejected (calling AE not in --allow-aet)" in caplog.text


def _fake_case(run_dir: Path):
    a = SimpleNamespace(verdict=SimpleNamespace(label="normal"), organ="lung")
    return SimpleNamespace(analysis=a, run_dir=run_dir, report_error=None, history_error=None)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_full_queue_is_refused_with_0xA700_and_a_crash_is_survived(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dicompipe.pacs")
    release = threading.Event()
    calls = []

    def slow_run_case(folder, **kw):
        calls.append(folder)
        if len(calls) == 1:
            release.wait(60)                     # the worker is busy with the first series
        if len(calls) == 2:
            raise RuntimeError(f"cannot read series of {NAME} ({PID}) under {folder}")
        if len(calls) == 3:
            raise SystemExit("the worker thread dies")
        return _fake_case(tmp_path / f"run{len(calls)}")
    monkeypatch.setattr(pipeline, "run_case", slow_run_case)
    studies = [make_study(tmp_path / f"st{k}", n=3) for k in range(5)]
    lst = Listener(port=0, out=tmp_path / "runs", settle_s=0.3, queue_size=1,
                   case_options={"history": False}).start()
    port = lst.address[1]
    try:
        assert send(studies[0], port) == [0, 0, 0]
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:       # A is being analysed
            time.sleep(0.05)
        assert send(studies[1], port) == [0, 0, 0]              # B waits in the queue
        time.sleep(1.0)
        assert send(studies[2], port) == [OUT_OF_RESOURCES] * 3  # C is refused, not dropped
        release.set()
        assert [o.error for o in lst.wait(2, timeout=20)][1].startswith("RuntimeError")
        assert send(studies[2], port) == [0, 0, 0]              # room again: C is taken
        lst.wait(3, timeout=20)
        assert send(studies[3], port) == [0, 0, 0]              # after the crash: D is done
        outcomes = lst.wait(4, timeout=30)
    finally:
        release.set()
        lst.stop(timeout=30)
    assert [o.error is None for o in outcomes] == [True, False, False, True]
    assert "<withheld>" in outcomes[1].error and "the worker crashed" in outcomes[2].error
    assert lst.refused["queue_full"] == 3
    assert len(list((lst.spool / "failed").iterdir())) == 2     # kept for a person to look at
    assert "the queue is full (1 waiting); out of resources -> status 0xA700" in caplog.text
    assert "the worker stopped unexpectedly; starting a new one" in caplog.text
    _no_identifiers(caplog.text, [studies[0][0].StudyInstanceUID])


def test_sigterm_keeps_what_it_holds_and_the_next_start_resumes(tmp_path, monkeypatch):
    port = free_port()
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "dicompipe.cli", "listen", "--port", str(port),
                             "--out", str(out), "--settle", "60", "--no-history"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        statuses = [None]
        while time.monotonic() < deadline and statuses == [None]:
            time.sleep(0.5)
            statuses = send(make_study(tmp_path / "a", n=3)[:1], port) if proc.poll() is None \
                else statuses
        study = make_study(tmp_path / "b", n=3)
        assert send(study, port) == [0, 0, 0]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped: 0 case(s) done; 2 series kept in the spool" in err, err
    _no_identifiers(err, [study[0].StudyInstanceUID, study[0].SeriesInstanceUID])
    seen = []
    monkeypatch.setattr(pipeline, "run_case",
                        lambda folder, **kw: seen.append(len(list(Path(folder).glob("*.dcm"))))
                        or _fake_case(out / "x"))
    lst = Listener(port=0, out=out, settle_s=0.3, case_options={"history": False}).start()
    try:
        assert len(lst.wait(2, timeout=20)) == 2
    finally:
        lst.stop(timeout=10)
    assert sorted(seen) == [1, 3]


def test_logs_keep_only_dicompipe_lines(tmp_path):
    """highdicom logs SOP Instance UIDs at INFO and warnings may quote a patient name: the
    listener's log handler lets neither through."""
    import io
    import warnings

    from dicompipe.pacs.common import setup_logging
    buf, seen = io.StringIO(), io.StringIO()
    handler = setup_logging(buf)
    spy = logging.StreamHandler(seen)                   # proves the warning reached logging
    logging.getLogger("py.warnings").addHandler(spy)
    try:
        uid = generate_uid()
        logging.getLogger("highdicom.base").warning('copy attributes from dataset "%s"', uid)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f'The string "{NAME}" is unlikely to be a person name', stacklevel=2)
        logging.getLogger("pynetdicom.acse").error("Association Rejected")
        logging.getLogger("dicompipe.pacs").info("series u:0123456789 done")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger("py.warnings").removeHandler(spy)
        logging.captureWarnings(False)
    text = buf.getvalue()
    assert NAME in seen.getvalue()
    assert "series u:0123456789 done" in text and "Association Rejected" in text
    _no_identifiers(text, [uid])


@pytest.mark.parametrize("failures, forwarded", [(1, 2), (3, 0)])
def test_a_failed_forward_is_tried_again(tmp_path, monkeypatch, caplog, failures, forwarded):
    """A PACS that refuses once (restarting, busy) gets the results on the next try; one
    that keeps refusing leaves them in the run folder, the error named in the outcome."""
    from dicompipe.errors import PacsError
    from dicompipe.pacs import dimse

    caplog.set_level(logging.INFO, logger="dicompipe.pacs")
    tries = []

    def flaky_send(files, peer, aet, timeout=30.0):
        tries.append(peer)
        if len(tries) <= failures:
            raise PacsError(f"{peer} did not accept an association")
        return 2
    monkeypatch.setattr(dimse, "send", flaky_send)
    monkeypatch.setattr(pipeline, "run_case", lambda folder, **kw: _fake_case(tmp_path / "run"))
    lst = Listener(port=0, out=tmp_path / "runs", settle_s=0.3, forward=Peer("PACS", "127.0.0.1", 1),
                   forward_retries=2, forward_wait_s=0.05, case_options={"history": False}).start()
    try:
        assert send(make_study(tmp_path / "st", n=2), lst.address[1]) == [0, 0]
        outcome = lst.wait(1, timeout=20)[0]
    finally:
        lst.stop(timeout=10)
    assert len(tries) == min(failures + 1, 3) and outcome.forwarded == forwarded
    assert (outcome.error is None) == (failures < 3)
    assert "trying again in 0 s (1 of 2)" in caplog.text
