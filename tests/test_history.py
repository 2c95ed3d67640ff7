"""Case history: record/list/show/export, pseudonyms, bad databases, concurrent writers."""
from __future__ import annotations

import csv
import io
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest
from analysis_factory import make_analysis

from dicompipe import history
from dicompipe.cli import main as cli_main
from dicompipe.errors import HistoryError


def test_record_roundtrip_with_pseudonym(tmp_history):
    a = make_analysis()
    rid = history.record(a, report_dir="/tmp/run1")
    r = history.get(rid)
    assert r["status"] == "done" and r["reason"] is None
    assert r["label"] == a.verdict.label == "malignant"
    assert r["probabilities"] == pytest.approx(a.verdict.probabilities, abs=1e-6)
    assert r["model_name"] == a.model["name"] and r["model_sha256"] == a.model["sha256"]
    assert r["study_uid"] == a.series.study_instance_uid
    assert r["organ"] == "lung" and r["report_dir"].endswith("run1")
    assert r["patient"].startswith("P-") and "SYNTH001" not in r["patient"]
    assert r["patient_id"] is None and r["patient_name"] is None      # no PHI by default
    # same patient -> same pseudonym within one database
    assert history.get(history.record(a, report_dir=None))["patient"] == r["patient"]


def test_include_phi_keeps_raw_id_and_patient_filter(tmp_history):
    history.record(make_analysis(include_phi=True), report_dir=None)
    history.record(make_analysis(), report_dir=None)
    rows = history.list_records()
    assert [r["patient_id"] for r in rows] == [None, "SYNTH001"]       # newest first
    assert len(history.list_records(patient="SYNTH001")) == 1
    assert len(history.list_records(patient=rows[0]["patient"])) == 2


def test_failed_record_and_filters(tmp_history):
    history.record(make_analysis(organ="pancreas"), report_dir=None, status="failed",
                   reason="Cannot write the report folder under /x")
    history.record(make_analysis(), report_dir="/tmp/r")
    assert [r["status"] for r in history.list_records(organ="pancreas")] == ["failed"]
    assert history.list_records(status="failed")[0]["reason"].startswith("Cannot write")
    assert len(history.list_records(since="2000-01-01")) == 2
    assert history.list_records(since="2999-01-01") == []
    with pytest.raises(HistoryError, match="YYYY-MM-DD"):
        history.list_records(since="yesterday")
    with pytest.raises(HistoryError, match="status"):
        history.record(make_analysis(), report_dir=None, status="maybe")


def test_content_hash_tracks_source_bytes(tmp_path, tmp_history):
    a = make_analysis(tmp_path / "src")
    h1 = history.get(history.record(a, report_dir=None))["input_hash"]
    assert len(h1) == 64
    assert history.content_hash(a) == h1
    b = make_analysis(tmp_path / "other")          # new UIDs -> different bytes
    assert history.content_hash(b) != h1


def test_export_csv(tmp_history, tmp_path):
    for _ in range(3):
        history.record(make_analysis(), report_dir=None)
    out = tmp_path / "cases.csv"
    assert history.export_csv(out) == 3
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and rows[0]["label"] == "malignant"
    assert set(rows[0]) == set(history.COLUMNS)
    buf = io.StringIO()
    assert history.export_csv(buf, organ="pancreas") == 0
    assert buf.getvalue().startswith("id,recorded")


def test_wal_mode_and_schema_version(tmp_history):
    history.record(make_analysis(), report_dir=None)
    con = sqlite3.connect(tmp_history)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION
    con.close()


#: the schema dicompipe wrote before the web app recorded its users (version 1)
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE analyses (
    id INTEGER PRIMARY KEY AUTOINCREMENT, recorded TEXT NOT NULL, analysed TEXT,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')), reason TEXT,
    input_path TEXT NOT NULL, input_hash TEXT, study_uid TEXT, series_uid TEXT, patient TEXT,
    patient_id TEXT, patient_name TEXT, organ TEXT, label TEXT, uncertain INTEGER,
    probabilities TEXT, model_name TEXT, model_version TEXT, model_sha256 TEXT,
    report_dir TEXT, n_slices INTEGER, warnings TEXT);
INSERT INTO meta VALUES ('pseudonym_key', '00112233445566778899aabbccddeeff');
INSERT INTO analyses (recorded, status, input_path, label, probabilities, warnings)
    VALUES ('2026-01-02T03:04:05+00:00', 'done', 'I-old', 'normal', '{"normal": 0.9}', '[]');
PRAGMA user_version = 1;
"""


def test_version_1_database_is_migrated_and_keeps_its_cases(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript(_V1_SCHEMA)
    con.close()
    (old,) = history.list_records(db)                   # readable as before, no user
    assert old["input_path"] == "I-old" and old["user_id"] is None
    rid = history.record(make_analysis(), report_dir=None, db=db, user="alice")
    assert history.get(rid, db)["user_id"] == "alice"
    assert [r["id"] for r in history.list_records(db, user="alice")] == [rid]
    assert len(history.list_records(db)) == 2           # no user given: every case
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION == 2
    assert "analyses_user" in {r[0] for r in con.execute(
        "SELECT name FROM sqlite_master WHERE type='index'")}
    con.close()


def test_users_see_only_their_own_cases(tmp_history):
    a, b = (history.record(make_analysis(), report_dir=None, user=u) for u in ("alice", "bob"))
    history.record(make_analysis(), report_dir=None)    # the CLI: no user
    assert [r["id"] for r in history.list_records(user="alice")] == [a]
    assert [r["id"] for r in history.list_records(user="bob")] == [b]
    assert history.list_records(user="carol") == []
    assert len(history.list_records()) == 3


def test_corrupt_database_is_named_and_never_replaced(tmp_path):
    db = tmp_path / "history.sqlite"
    junk = b"this is not sqlite at all " * 200
    db.write_bytes(junk)
    with pytest.raises(HistoryError, match="history.sqlite.*left untouched"):
        history.record(make_analysis(), report_dir=None, db=db)
    with pytest.raises(HistoryError, match=str(db)):
        history.list_records(db)
    assert db.read_bytes() == junk


def test_foreign_sqlite_database_is_refused(tmp_path):
    db = tmp_path / "other.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE patients (x)")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(HistoryError, match="not a dicompipe case history"):
        history.record(make_analysis(), report_dir=None, db=db)
    assert db.read_bytes() == before


def test_history_created_by_another_process_mid_check_is_not_foreign(tmp_path):
    """Another process creates the history between our reads of its version and its tables
    (the race behind a flaky two-writer run): both reads come from one snapshot, so it is
    not taken for someone else's database."""
    db = tmp_path / "h.sqlite"
    setup = sqlite3.connect(db)
    setup.execute("PRAGMA journal_mode = WAL").fetchall()     # readers and a writer at once
    setup.close()
    other = sqlite3.connect(db, isolation_level=None)

    class Rows(list):             # what the code reads of a cursor
        def fetchall(self):
            return list(self)

        def fetchone(self):
            return self[0] if self else None

    class CreatedMidway:          # our connection; the other one creates the history mid-check
        def __init__(self, con):
            self.con, self.fired = con, False

        def __getattr__(self, name):
            return getattr(self.con, name)

        def execute(self, sql, *args):
            rows = self.con.execute(sql, *args).fetchall()
            if sql == "PRAGMA user_version" and not self.fired:
                self.fired = True
                history._init(other, db)
            return Rows(rows)

    mine = CreatedMidway(sqlite3.connect(db, isolation_level=None))
    history._init(mine, db)                                   # no "not a dicompipe case history"
    assert mine.fired and mine.con.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION


def test_database_inside_input_is_refused(tmp_path):
    a = make_analysis(tmp_path / "src")
    with pytest.raises(HistoryError, match="inside the analysed input"):
        history.record(a, report_dir=None, db=tmp_path / "src" / "h.sqlite")
    assert not (tmp_path / "src" / "h.sqlite").exists()


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("DICOMPIPE_HISTORY", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if history.sys.platform.startswith("linux"):
        assert history.default_path() == tmp_path / "xdg" / "dicompipe" / "history.sqlite"
    monkeypatch.setenv("DICOMPIPE_HISTORY", str(tmp_path / "h.db"))
    assert history.default_path() == tmp_path / "h.db"


def test_missing_record_and_missing_db(tmp_path):
    with pytest.raises(HistoryError, match="No case history"):
        history.get(1, db=tmp_path / "none.sqlite")
    assert history.list_records(tmp_path / "none.sqlite") == []
    history.record(make_analysis(), report_dir=None, db=tmp_path / "h.sqlite")
    with pytest.raises(HistoryError, match="No record 99"):
        history.get(99, db=tmp_path / "h.sqlite")


def test_cli_list_show_export(tmp_path, capsys):
    db = tmp_path / "h.sqlite"
    rid = history.record(make_analysis(), report_dir="/tmp/run", db=db)
    assert cli_main(["history", "--db", str(db), "list"]) == 0
    out = capsys.readouterr().out
    assert "malignant" in out and "1 record(s)" in out
    assert cli_main(["history", "--db", str(db), "show", str(rid)]) == 0
    assert "lung-resnet50-test" in capsys.readouterr().out
    assert cli_main(["history", "--db", str(db), "export", "--csv", str(tmp_path / "x.csv")]) == 0
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 2
    assert cli_main(["history", "--db", str(db), "show", "42"]) == 2      # clear error, no trace
    assert "No record 42" in capsys.readouterr().err


def _writer(db: str, n: int, tag: int) -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from analysis_factory import make_analysis as mk
    a = mk()
    for i in range(n):
        history.record(a, report_dir=f"/runs/{tag}/{i}", db=db)


def test_two_processes_recording_at_once_lose_nothing(tmp_path):
    db = str(tmp_path / "h.sqlite")
    n = 20
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, n, t)) for t in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = history.list_records(db)
    assert len(rows) == 2 * n
    assert len({r["id"] for r in rows}) == 2 * n
    for t in (1, 2):
        assert sorted(int(r["report_dir"].rsplit("/", 1)[1]) for r in rows
                      if f"/runs/{t}/" in r["report_dir"]) == list(range(n))
