"""The Streamlit app driven by Streamlit's AppTest (no browser, no model).

The library calls the app makes are replaced by fakes that return a hand-built Analysis
(tests/analysis_factory.py): discovery in ``dicompipe.ui.services``, and behind the app's one
door for a case, ``pipeline.run_case``, the stages it runs (``pipeline.analyze``,
``report.write``, ``history.check``/``record``), so these flows test the app and its path
through run_case: upload -> series -> analyse -> verdict/viewer/downloads, history, bad uploads.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import io
import json
import stat
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# looked up, not imported: importing streamlit at collection is slow (AppTest is imported in _app)
if importlib.util.find_spec("streamlit") is None:
    pytest.skip("the web app needs the [ui] extra (streamlit)", allow_module_level=True)
from analysis_factory import make_analysis  # noqa: E402

from dicompipe import history, pipeline, report  # noqa: E402
from dicompipe.errors import NoSeriesFound, UnsupportedInput  # noqa: E402
from dicompipe.ui import inputs, services  # noqa: E402

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

APP = str(Path(services.__file__).with_name("app.py"))


@pytest.fixture
def fake_library(tmp_path, monkeypatch):
    """Replace the app's library calls; returns a dict recording what was called."""
    calls: dict = {"analyze": [], "history": [], "reports": [], "checked": []}
    analysis = make_analysis()
    monkeypatch.setenv("DICOMPIPE_UI_DATA_ROOTS", str(tmp_path))   # server folders allowed here
    for k in ("DICOMPIPE_UI_TOKEN", "DICOMPIPE_UI_TOKEN_FILE", "DICOMPIPE_UI_AUTH",
              "DICOMPIPE_UI_INSECURE"):
        monkeypatch.delenv(k, raising=False)

    def discover(path):
        p = Path(path)
        assert p.exists(), "the app must stage the upload before discovery"
        if not any(p.rglob("*")):
            raise NoSeriesFound(f"No usable CT series in {path}: the folder is empty.")
        return [analysis.series], analysis.series

    def analyze(path, *, organ, series, include_phi, select_slices, progress, model=None,
                allow_untrained=False, backend="auto"):
        assert Path(path).exists(), "the upload must still be on disk while analysing"
        calls["analyze"].append(dict(path=path, organ=organ, series=series,
                                     include_phi=include_phi, select_slices=select_slices))
        for stage, f in (("discover", 0.0), ("load", 0.1), ("preprocess", 0.25),
                         ("predict", 0.4), ("explain", 0.85)):
            progress(stage, f, stage)
        analysis.include_phi = include_phi
        return analysis

    def write_reports(a, out, *, formats, cam_slices, cam_nifti, ct_nifti, include_phi, deidentify):
        assert list(formats) == ["txt", "png", "json"] and include_phi == a.include_phi
        d = tmp_path / "runs" / "run-001"
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.txt").write_text("dicompipe report\nverdict: " + a.verdict.label + "\n")
        (d / "analysis.json").write_text(json.dumps({"verdict": {"label": a.verdict.label}}))
        (d / "key_slice_1.png").write_bytes(b"\x89PNG fake")
        calls["reports"].append(d)
        return d

    def record_history(a, *, report_dir, **kw):
        calls["history"].append((a.verdict.label, report_dir, kw))
        return len(calls["history"])

    def history_rows(since=None, organ=None):
        today = _dt.datetime.now(_dt.timezone.utc)
        rows = [{"id": 2, "recorded": today.isoformat(timespec="seconds"), "organ": "lung",
                 "label": "malignant", "probabilities": {"normal": 0.1, "malignant": 0.87},
                 "uncertain": False, "status": "done", "patient": "P-0123456789ab",
                 "patient_id": "SECRET-ID", "input_path": "/tmp/x/case-a",
                 "report_dir": str(tmp_path / "runs" / "run-001")},
                {"id": 1, "recorded": (today - _dt.timedelta(days=1)).isoformat(),
                 "organ": "pancreas", "label": "normal",
                 "probabilities": {"normal": 0.91, "tumour": 0.09}, "uncertain": False,
                 "status": "done", "patient": None, "patient_id": "OTHER-ID",
                 "report_dir": str(tmp_path / "nowhere")}]
        return [r for r in rows if organ is None or r["organ"] == organ]

    monkeypatch.setattr(services, "discover", discover)
    monkeypatch.setattr(pipeline, "analyze", analyze)
    monkeypatch.setattr(report, "write", write_reports)
    monkeypatch.setattr(history, "check", lambda db=None, input_path=None: calls["checked"].append(db))
    monkeypatch.setattr(history, "record", record_history)
    monkeypatch.setattr(services, "history_rows", history_rows)
    monkeypatch.setattr(services, "load_bundle", lambda organ: None)
    calls["analysis"] = analysis
    return calls


def _app() -> AppTest:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=240)   # busy CI machines
    at.run()
    assert not at.exception, at.exception
    return at


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    """A zip as the `zip` tool writes it (regular-file modes; names ending / are folders)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, d in files.items():
            info = zipfile.ZipInfo(n)
            info.external_attr = ((stat.S_IFDIR | 0o755) if n.endswith("/")
                                  else (stat.S_IFREG | 0o644)) << 16
            zf.writestr(info, d)
    return buf.getvalue()


def _analysed(tmp_path) -> AppTest:
    """The app after analysing a server folder."""
    case = tmp_path / "case"
    case.mkdir(exist_ok=True)
    (case / "1.dcm").write_bytes(b"x")
    at = _app()
    at.radio(key="source").set_value("folder")
    at.run()
    at.text_input(key="folder").input(str(case))
    at.run()
    at.button(key="run").click()
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(at) -> str:
    return "\n".join(m.value for m in at.markdown) + "\n".join(c.value for c in at.caption)


def test_start_page_is_calm_and_explains(fake_library):
    at = _app()
    assert "Start with a CT" in _texts(at)
    assert at.button(key="run").disabled            # nothing to analyse yet
    assert "RESEARCH USE ONLY" in _texts(at)


def test_upload_to_result(fake_library):
    at = _app()
    at.file_uploader(key="upload").upload("study.zip", _zip_bytes({"ct/1.dcm": b"x" * 200}),
                                          "application/zip")
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="series_key").value == "s1"          # discovered and chosen
    assert "the only usable CT series" in _texts(at)             # ... with why
    at.selectbox(key="organ").set_value("lung")
    at.button(key="run").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    call = fake_library["analyze"][0]
    assert call["organ"] == "lung" and call["series"] is None
    assert call["include_phi"] is False and call["select_slices"] is True
    text = _texts(at)
    assert "Malignant" in text and "Calibrated probability" in text
    assert "RESEARCH USE ONLY" in text
    assert "Notes from the pipeline" in text                    # warnings shown, calmly
    a = fake_library["analysis"]
    # the slider counts slices from 0 (z, as the reports do), covers all model slices and
    # opens on the first key slice
    slider = at.slider(key="slice")
    assert (slider.min, slider.max) == (0, len(a.batch.slices) - 1)
    assert slider.value == a.verdict.key_slices[0].z
    z = a.verdict.key_slices[0].z
    assert f"Slice z {z} of 0–{len(a.batch.slices) - 1} (counted from 0" in text
    assert "key slice" in text and "Grad-CAM for" in text       # caption and colour bar
    # the history was checked first, then got the case with its report folder (through
    # pipeline.run_case), and the upload is gone from disk
    assert fake_library["checked"] == [None]
    assert fake_library["history"] and fake_library["history"][0][1] == fake_library["reports"][0]
    assert not Path(call["path"]).exists()
    # analysing again (e.g. after choosing another organ) stages the upload afresh
    at.button(key="run").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(fake_library["analyze"]) == 2
    assert not Path(fake_library["analyze"][1]["path"]).exists()


def test_slider_skipped_slice_and_controls(fake_library, tmp_path):
    at = _analysed(tmp_path)
    assert not at.exception, at.exception
    at.slider(key="slice").set_value(0)                          # slice z 0 is skipped
    at.run()
    assert not at.exception, at.exception
    assert "Not analysed" in _texts(at)
    assert "no lung in slice" in _texts(at)
    at.slider(key="slice").set_value(5)
    at.toggle(key="cam_on").set_value(False)
    at.segmented_control(key="window").set_value("Mediastinum")
    at.run()
    assert not at.exception, at.exception
    assert "Grad-CAM for" not in _texts(at)                       # overlay off: no colour bar
    at.toggle(key="cam_on").set_value(True)
    labels = fake_library["analysis"].cams.labels
    cls = next(s for s in at.selectbox if s.options == labels)
    cls.set_value("normal")
    at.run()
    assert not at.exception, at.exception
    assert "Grad-CAM for normal" in _texts(at).replace("<b>", "").replace("</b>", "")


def test_key_slice_jump(fake_library, tmp_path):
    at = _analysed(tmp_path)
    at.slider(key="slice").set_value(0)
    at.run()
    jump = at.selectbox(key="key_jump")
    target = jump.options[-1]
    jump.select_index(len(jump.options) - 1)
    at.run()
    assert not at.exception, at.exception
    assert f" z {at.slider(key='slice').value} " in target
    # the jump list follows the verdict's ranking, not the slice order
    ranked = fake_library["analysis"].verdict.key_slices
    assert [o.split()[:3] for o in jump.options[1:]] == [[f"#{i}", "z", str(k.z)]
                                                          for i, k in enumerate(ranked, 1)]


def test_downloads_offer_report_files(fake_library, tmp_path):
    at = _analysed(tmp_path)
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Report (TXT)", "Analysis (JSON)", "Annotated images (zip)",
                      "Everything (zip)"]
    dl = services.downloads(fake_library["reports"][0])
    assert dl["txt"][1].startswith(b"dicompipe report")
    names = zipfile.ZipFile(io.BytesIO(dl["zip"][1])).namelist()
    assert sorted(names) == ["run-001/analysis.json", "run-001/key_slice_1.png",
                             "run-001/report.txt"]
    assert zipfile.ZipFile(io.BytesIO(dl["png"][1])).namelist() == ["run-001/key_slice_1.png"]
    assert "patient identifiers left out" in _texts(at)


def test_history_filters_and_opens_report(fake_library, tmp_path):
    at = _app()
    # write the report that history row 1 points to
    d = tmp_path / "runs" / "run-001"
    d.mkdir(parents=True)
    (d / "report.txt").write_text("dicompipe report\nverdict: malignant\n")
    frames = at.dataframe
    assert frames, "history table missing"
    df = frames[-1].value
    assert set(df["organ"]) == {"lung", "pancreas"}
    assert "patient_id" not in df.columns                        # PHI hidden by default
    assert "SECRET-ID" not in df.to_string()
    at.selectbox(key="h_organ").set_value("pancreas")
    at.run()
    assert list(at.dataframe[-1].value["organ"]) == ["pancreas"]
    at.selectbox(key="h_organ").set_value("any")
    at.multiselect(key="h_verdict").set_value(["malignant"])
    at.run()
    assert list(at.dataframe[-1].value["verdict"]) == ["malignant"]
    at.toggle(key="phi").set_value(True)
    at.run()
    assert "patient_id" in at.dataframe[-1].value.columns
    # open the selected case's report
    at.session_state["h_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert any("verdict: malignant" in c.value for c in at.code)
    assert "Download this report (TXT)" in [b.label for b in at.get("download_button")]


def test_bad_upload_is_one_clear_message(fake_library):
    at = _app()
    evil = _zip_bytes({"../../etc/evil.dcm": b"x"})
    at.file_uploader(key="upload").upload("evil.zip", evil, "application/zip")
    at.run()
    assert not at.exception, at.exception
    errs = [e.value for e in at.error]
    assert len(errs) == 1 and "unsafe" in errs[0].lower()
    assert at.button(key="run").disabled
    # a readable upload with no series: the io stage's message, not a traceback
    at.file_uploader(key="upload").clear()
    at.run()
    at.file_uploader(key="upload").upload("notes.zip", _zip_bytes({"empty/": b""}),
                                          "application/zip")
    at.run()
    assert not at.exception, at.exception
    errs = [e.value for e in at.error]
    assert len(errs) == 1 and "No usable CT series" in errs[0]


def test_analysis_error_is_one_clear_message(fake_library, monkeypatch, tmp_path):
    def boom(*a, **k):
        raise UnsupportedInput("Cannot choose the organ automatically: pass lung or pancreas.")
    monkeypatch.setattr(pipeline, "analyze", boom)
    at = _analysed(tmp_path)
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == [
        "Cannot choose the organ automatically: pass lung or pancreas."]

    def crash(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(pipeline, "analyze", crash)
    at.button(key="run").click()
    at.run()
    assert not at.exception, at.exception
    (msg,) = [e.value for e in at.error]
    assert "Something went wrong" in msg and "Traceback" not in msg


# --------------------------------------------------------------------------- staging
def test_stage_uploads_files_zip_and_bounds():
    s = inputs.stage_uploads([("a/../1.dcm", b"x"), ("1.dcm", b"y"), ("IMG0001", b"z")])
    try:
        names = sorted(p.name for p in s.path.iterdir())
        assert len(names) == 3 and all("/" not in n and ".." not in n for n in names)
        assert s.kind == "dicom"
    finally:
        s.cleanup()
    assert not s.path.exists()
    z = inputs.stage_uploads([("case.zip", _zip_bytes({"case/ser/1.dcm": b"x", "case/2.dcm": b"y"}))])
    try:
        assert sorted(p.name for p in z.path.rglob("*.dcm")) == ["1.dcm", "2.dcm"]
        tmp_root = Path(z._tmp.name)
        assert tmp_root in z.path.parents                     # extracted inside our temp folder
        assert not list(tmp_root.rglob("*.zip"))               # the zip itself is not kept
    finally:
        z.cleanup()
    assert not z.path.exists() and not tmp_root.exists()
    png = inputs.stage_uploads([("s1.png", b"p"), ("s2.png", b"p")])
    assert png.kind == "images"
    png.cleanup()
    with pytest.raises(UnsupportedInput, match="above the limit"):
        inputs.stage_uploads([("big.dcm", b"x" * 100)], max_total_bytes=10)
    with pytest.raises(UnsupportedInput, match="one zip or individual files"):
        inputs.stage_uploads([("a.zip", _zip_bytes({"1": b""})), ("b.dcm", b"x")])
    with pytest.raises(UnsupportedInput, match="Nothing was uploaded"):
        inputs.stage_uploads([])


def test_zip_bombs_and_links_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_UNZIPPED_BYTES", 1000)
    before = set(Path(inputs.tempfile.gettempdir()).glob("dicompipe-ui-*"))
    with pytest.raises(UnsupportedInput):                      # through the io stage's extractor
        inputs.stage_uploads([("bomb.zip", _zip_bytes({"x": b"0" * 5000}))])
    with pytest.raises(UnsupportedInput, match="(?i)unsafe"):
        inputs.stage_uploads([("evil.zip", _zip_bytes({"../x.dcm": b"0"}))])
    assert set(Path(inputs.tempfile.gettempdir()).glob("dicompipe-ui-*")) == before  # no leftovers
    # the app's extractor is the io stage's, with the app's bounds
    with pytest.raises(UnsupportedInput, match="expands to"):
        inputs.extract_zip(_write(tmp_path / "b.zip", _zip_bytes({"x": b"0" * 5000})), tmp_path / "o")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsupportedInput, match="link"):
        inputs.extract_zip(_write(tmp_path / "l.zip", buf.getvalue()), tmp_path / "o2")
    with pytest.raises(UnsupportedInput, match="as a zip archive"):
        inputs.extract_zip(_write(tmp_path / "n.zip", b"PK\x03\x04garbage"), tmp_path / "o3")
    assert not list(tmp_path.glob("dicompipe-zip-*"))                 # nothing left behind


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_launch_command_and_missing_streamlit(monkeypatch):
    import importlib.util
    import types

    from dicompipe import ui
    from dicompipe.errors import DicompipeError

    cmd = ui.streamlit_command(port=8765, host="127.0.0.1")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    assert "--server.port=8765" in cmd and "--server.address=127.0.0.1" in cmd
    assert "--server.headless=true" in cmd and "--browser.gatherUsageStats=false" in cmd
    assert any(c.startswith("--server.maxUploadSize=") for c in cmd)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "streamlit" else real(n, *a))
    with pytest.raises(DicompipeError, match=r"pip install 'dicompipe\[ui\]'"):
        ui.launch(types.SimpleNamespace(port=8765, host="localhost"))


def test_key_slice_label_shows_the_share_in_the_lung_fields_when_ranked_by_it():
    from dicompipe.types import KeySlice
    from dicompipe.ui import views
    k = KeySlice(row=0, z=44, volume_z=[44], instance_numbers=[20], sop_instance_uids=["1"],
                 files=["f"], probability=0.986, in_region=0.996)
    assert views.key_label(k, 1) == "#1 z 44 (99%, 100% in lung)"
    k.in_region = None
    assert views.key_label(k, 2) == "#2 z 44 (99%)"
