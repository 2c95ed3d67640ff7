"""pipeline.run_case: analysis -> reports -> history with one failure policy (the path the CLI
and the web app take). The analysis is a hand-built one (no model); reports and history are real.
"""
from __future__ import annotations

import pytest
from analysis_factory import make_analysis

from dicompipe import history, pipeline
from dicompipe.errors import HistoryError, ReportError


@pytest.fixture
def fake_analyze(monkeypatch):
    calls = []

    def analyze(path, **kw):
        calls.append(kw)
        return make_analysis(n_z=4, lesion_z=(2,), k=2, include_phi=kw.get("include_phi", False))
    monkeypatch.setattr(pipeline, "analyze", analyze)
    return calls


def _staging(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".dicompipe-run-")] if folder.exists() else []


def test_run_case_writes_reports_and_records(tmp_path, tmp_history, fake_analyze):
    seen = []
    res = pipeline.run_case(tmp_path / "in", organ="lung", out=tmp_path / "runs",
                            formats="txt,json", progress=lambda *a: seen.append(a[0]),
                            select_slices=False, series="3")
    assert res.ok and res.errors == []
    assert sorted(p.name for p in res.run_dir.iterdir()) == ["analysis.json", "report.txt"]
    rec = history.get(res.record_id)
    assert rec["status"] == "done" and rec["report_dir"] == str(res.run_dir.resolve())
    # analyze options go through; the report stage is announced
    assert fake_analyze[0]["select_slices"] is False and fake_analyze[0]["series"] == "3"
    assert fake_analyze[0]["organ"] == "lung" and seen == ["report", "history", "done"]


def test_failed_report_is_recorded_as_failed_and_leaves_nothing(tmp_path, tmp_history,
                                                                fake_analyze, monkeypatch):
    from dicompipe.report import analysis_json

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(analysis_json, "write", broken)
    out = tmp_path / "runs"
    res = pipeline.run_case(tmp_path / "in", organ="lung", out=out, formats="txt,png,json")
    assert isinstance(res.report_error, ReportError) and res.run_dir is None
    assert "No space left" in str(res.report_error) and not res.ok
    assert list(out.iterdir()) == []                           # no run folder, no staging left
    rec = history.get(res.record_id)
    assert rec["status"] == "failed" and rec["report_dir"] is None
    assert "No space left" in rec["reason"]


def test_checks_before_any_work(tmp_path, fake_analyze):
    with pytest.raises(ReportError, match="Unknown report format"):
        pipeline.run_case(tmp_path / "in", out=tmp_path / "runs", formats="txt,pdf", history=False)
    folder_db = tmp_path / "db"
    folder_db.mkdir()
    with pytest.raises(HistoryError, match="is a folder"):
        pipeline.run_case(tmp_path / "in", out=tmp_path / "runs", history=folder_db)
    assert fake_analyze == [] and not _staging(tmp_path / "runs")


def test_no_history_and_history_error_keeps_report(tmp_path, tmp_history, fake_analyze, monkeypatch):
    res = pipeline.run_case(tmp_path / "in", out=tmp_path / "runs", formats="json", history=False)
    assert res.ok and res.record_id is None and not tmp_history.exists()

    def locked(*a, **k):
        raise HistoryError("database is locked")
    monkeypatch.setattr(history, "record", locked)
    res = pipeline.run_case(tmp_path / "in", out=tmp_path / "runs", formats="json")
    assert isinstance(res.history_error, HistoryError) and res.report_error is None
    assert (res.run_dir / "analysis.json").is_file()            # the report stays
