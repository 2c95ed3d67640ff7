"""Case history: every analysis recorded in a local SQLite database.

One row per analysis: when, input path and content hash, study/series UID, a patient
pseudonym (the raw patient ID/name only when the analysis was run with ``include_phi``;
without it the input path is an ``I-`` pseudonym and warnings/reasons name files as
``<input>/file-NNNN``, see :mod:`dicompipe.phi`),
organ, verdict, calibrated probabilities, model name/version/sha256, report folder, and
status ("done" or "failed" with the reason).

Location: ``db`` argument, else ``$DICOMPIPE_HISTORY``, else the user data directory
(``$XDG_DATA_HOME/dicompipe/history.sqlite``, ``~/.local/share/...`` on Linux,
``~/Library/Application Support/dicompipe`` on macOS, ``%LOCALAPPDATA%\\dicompipe`` on
Windows) — never inside the analysed input. The database uses WAL and writes each record in
one transaction, so several processes can record at once. A file that is not a readable
history database raises :class:`HistoryError` naming it; it is never replaced.

The pseudonym is ``P-`` + 12 hex digits of HMAC-SHA256(patient ID) under a random key kept
in the database: stable within one database, not reversible without it.

Example::

    >>> from dicompipe import history
    >>> rid = history.record(analysis, report_dir=run_dir)
    >>> history.list_records(since="2026-01-01")[0]["label"]
    >>> history.get(rid)["probabilities"]
    >>> history.export_csv("cases.csv")
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import hmac
import io
import json
import os
import random
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dicompipe.errors import HistoryError
from dicompipe.phi import Redactor
from dicompipe.types import Analysis

SCHEMA_VERSION = 2
ENV = "DICOMPIPE_HISTORY"
STATUSES = ("done", "failed")

COLUMNS = ("id", "recorded", "analysed", "status", "reason", "input_path", "input_hash",
           "study_uid", "series_uid", "patient", "patient_id", "patient_name", "organ",
           "label", "uncertain", "probabilities", "model_name", "model_version",
           "model_sha256", "report_dir", "n_slices", "warnings", "user_id")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS analyses (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded TEXT NOT NULL,          -- UTC ISO time the record was written
    analysed TEXT,                   -- Analysis.created
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    reason TEXT,
    input_path TEXT NOT NULL,
    input_hash TEXT,                 -- sha256 over the chosen series' files
    study_uid TEXT, series_uid TEXT,
    patient TEXT,                    -- pseudonym
    patient_id TEXT, patient_name TEXT,   -- only with include_phi
    organ TEXT, label TEXT, uncertain INTEGER,
    probabilities TEXT,              -- JSON {label: calibrated probability}
    model_name TEXT, model_version TEXT, model_sha256 TEXT,
    report_dir TEXT, n_slices INTEGER,
    warnings TEXT,                   -- JSON list
    user_id TEXT                     -- who ran it (signed-in web app user), NULL otherwise
);
CREATE INDEX IF NOT EXISTS analyses_patient ON analyses(patient);
CREATE INDEX IF NOT EXISTS analyses_recorded ON analyses(recorded);
CREATE INDEX IF NOT EXISTS analyses_user ON analyses(user_id);
"""

#: schema version -> statements that bring a database of that version to the next one
_MIGRATIONS = {
    1: ["ALTER TABLE analyses ADD COLUMN user_id TEXT",
        "CREATE INDEX IF NOT EXISTS analyses_user ON analyses(user_id)"],
}


# --------------------------------------------------------------------------- location
def user_data_dir() -> Path:
    """The per-user data folder for dicompipe (platform convention, no extra package)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "dicompipe"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "dicompipe"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dicompipe"


def default_path() -> Path:
    """``$DICOMPIPE_HISTORY`` if set, else ``<user data dir>/history.sqlite``."""
    env = os.environ.get(ENV)
    return Path(env).expanduser() if env else user_data_dir() / "history.sqlite"


def _resolve(db: str | Path | None) -> Path:
    return Path(db).expanduser() if db else default_path()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


# --------------------------------------------------------------------------- connection
@contextlib.contextmanager
def _connect(db: str | Path | None, *, create: bool = True) -> Iterator[tuple[sqlite3.Connection, Path]]:
    path = _resolve(db)
    if not path.exists() and not create:
        raise HistoryError(f"No case history at {path}: nothing has been recorded there yet "
                           f"(set {ENV} or pass --db to use another database).")
    if path.exists() and path.is_dir():
        raise HistoryError(f"Case history path {path} is a folder; give a database file.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    except (OSError, sqlite3.Error) as e:
        raise HistoryError(f"Cannot open the case history {path}: {e}. Check the folder is "
                           f"writable or set {ENV} / --db to another file.") from e
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout = 30000")
        _init_retrying(con, path)
        yield con, path
    except sqlite3.OperationalError as e:
        if "full" in str(e).lower():
            raise HistoryError(f"The disk holding the case history {path} is full ({e}); "
                               "nothing was recorded. Free some space, or set "
                               f"{ENV} / --history to a file on another disk.") from e
        raise HistoryError(f"Cannot use the case history {path}: {e}. If another dicompipe "
                           "is writing a lot, try again; check the file and folder are "
                           "writable.") from e
    except sqlite3.DatabaseError as e:
        raise _corrupt(path, e) from e
    finally:
        con.close()


def _corrupt(path: Path, e: Exception) -> HistoryError:
    return HistoryError(
        f"The case history {path} is not a readable dicompipe history database ({e}). It was "
        f"left untouched: move it aside (or repair it) and run again, or set {ENV} / --db to "
        "another file.")


def _init_retrying(con: sqlite3.Connection, path: Path, seconds: float = 30.0) -> None:
    """_init, retried while another process creates the database or switches it to WAL.

    SQLite answers "database is locked" at once, without waiting for busy_timeout, when
    two connections would deadlock (both reading the new file, both wanting to change it).
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return _init(con, path)
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.02, 0.1))


def _init(con: sqlite3.Connection, path: Path) -> None:
    """Check the file is a dicompipe history (read-only), then WAL and the schema."""
    # version and tables from one snapshot: read apart, another process creating the
    # history in between looks like version 0 with tables, i.e. someone else's database
    con.execute("BEGIN")
    try:
        ver = con.execute("PRAGMA user_version").fetchall()[0][0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        _rollback(con)
    if ver > SCHEMA_VERSION:
        raise HistoryError(f"The case history {path} has schema version {ver}, newer than this "
                           f"dicompipe understands ({SCHEMA_VERSION}). Upgrade dicompipe or use "
                           "another database.")
    if ver == 0:
        # dicompipe creates its tables and sets user_version in one transaction, so a
        # version-0 file with tables belongs to someone else, even with an "analyses" table
        if tables:
            raise HistoryError(f"{path} is an SQLite database but not a dicompipe case history "
                               f"(tables: {', '.join(sorted(tables))}). It was left untouched; "
                               f"set {ENV} / --db to another file.")
    if con.execute("PRAGMA journal_mode").fetchall()[0][0].lower() != "wal":
        con.execute("PRAGMA journal_mode = WAL").fetchall()
    if ver == SCHEMA_VERSION:
        return
    con.execute("BEGIN IMMEDIATE")
    try:
        now = con.execute("PRAGMA user_version").fetchone()[0]    # another process may be done
        if now == 0:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                con.execute(stmt)
            con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('pseudonym_key', ?)",
                        (secrets.token_hex(32),))
        else:                                                       # an older database
            for v in range(now, SCHEMA_VERSION):
                for stmt in _MIGRATIONS[v]:
                    con.execute(stmt)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise


def _rollback(con: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite ends it itself on a full disk, and a
    second ROLLBACK would hide the real error behind "no transaction is active")."""
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


def _key(con: sqlite3.Connection) -> bytes:
    return bytes.fromhex(con.execute("SELECT value FROM meta WHERE key='pseudonym_key'")
                         .fetchone()[0])


def pseudonym(patient_id: str | None, key: bytes) -> str | None:
    """``P-`` + 12 hex digits of HMAC-SHA256(patient_id); None for a missing ID."""
    if not patient_id:
        return None
    return "P-" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


# --------------------------------------------------------------------------- recording
def content_hash(analysis: Analysis) -> str | None:
    """sha256 over the bytes of the chosen series' source files (in slice order).

    Falls back to the input file itself (NIfTI, zip). None when nothing can be read.
    """
    return series_hash(analysis.series, analysis.input)


def series_hash(series, input_path=None) -> str | None:
    """sha256 over the bytes of ``series``' source files in slice order (else of
    ``input_path`` when it is a file): the ``input_hash`` of the history, and the key a
    batch resumes by. None when nothing can be read.

    Example::

        >>> chosen = io.select(io.discover("study/"))
        >>> series_hash(chosen, "study/")
        '3f5a...'
    """
    files = list(dict.fromkeys(i.file for i in series.instances if i.file))
    if not files and input_path is not None and Path(input_path).is_file():
        files = [str(input_path)]
    h = hashlib.sha256()
    try:
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest() if files else None


def _refuse_inside(path: Path, src: Path) -> None:
    if src.is_dir() and _inside(path, src):
        raise HistoryError(f"The case history {path} lies inside the analysed input {src}; "
                           f"dicompipe never writes into its input. Set {ENV} or --history to "
                           "a file elsewhere.")


def check(db: str | Path | None = None, input_path=None) -> Path:
    """Open and validate the case history now (creating it if absent), before an analysis,
    so a bad database fails fast and no report folder is written for an analysis that
    cannot be recorded. Returns the database path; raises :class:`HistoryError`.

    Example::

        >>> history.check("cases.sqlite", input_path="study/")
        PosixPath('cases.sqlite')
    """
    path = _resolve(db)
    if input_path is not None:
        _refuse_inside(path, Path(input_path))
    with _connect(path):
        pass
    return path


def record(analysis: Analysis, *, report_dir: str | Path | None, db: str | Path | None = None,
           status: str = "done", reason: str | None = None, user: str | None = None) -> int:
    """Record one analysis (one transaction); return the new record id.

    ``status``: "done", or "failed" with ``reason`` (e.g. the report could not be written).
    ``user``: the signed-in web-app user who ran it (``list_records(user=...)`` finds it).
    Raises :class:`HistoryError` for a database that is unreadable, not a history, or
    inside the analysed input.
    """
    if status not in STATUSES:
        raise HistoryError(f"status must be one of {', '.join(STATUSES)}, got {status!r}.")
    path = _resolve(db)
    src = Path(analysis.input)
    _refuse_inside(path, src)
    s, vd, m = analysis.series, analysis.verdict, analysis.model or {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    scrub = (lambda t: t) if analysis.include_phi else Redactor.for_analysis(analysis).text
    real_input = str(src.resolve()) if src.exists() else str(src)
    row = dict(
        recorded=now, analysed=analysis.created or None, status=status,
        reason=scrub(reason) if reason else reason,
        input_path=real_input,
        input_hash=content_hash(analysis), study_uid=s.study_instance_uid,
        series_uid=s.series_instance_uid,
        patient_id=s.patient_id if analysis.include_phi else None,
        patient_name=s.patient_name if analysis.include_phi else None,
        organ=analysis.organ, label=vd.label, uncertain=int(bool(vd.uncertain)),
        probabilities=json.dumps({k: round(float(v), 6) for k, v in vd.probabilities.items()}),
        model_name=m.get("name"), model_version=m.get("version"), model_sha256=m.get("sha256"),
        report_dir=str(Path(report_dir).resolve()) if report_dir else None,
        n_slices=vd.n_slices, warnings=json.dumps([scrub(w) for w in analysis.warnings]),
        user_id=user)
    with _connect(path) as (con, p):
        con.execute("BEGIN IMMEDIATE")
        try:
            key = _key(con)
            row["patient"] = pseudonym(s.patient_id, key)
            if not analysis.include_phi:
                row["input_path"] = "I-" + hmac.new(key, real_input.encode("utf-8"),
                                                    hashlib.sha256).hexdigest()[:12]
            cols = ", ".join(row)
            cur = con.execute(f"INSERT INTO analyses ({cols}) VALUES ({', '.join('?' * len(row))})",
                              tuple(row.values()))
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return int(cur.lastrowid)


# --------------------------------------------------------------------------- reading
def _row(r: sqlite3.Row) -> dict:
    d = dict(r)
    d["probabilities"] = json.loads(d["probabilities"]) if d.get("probabilities") else {}
    d["warnings"] = json.loads(d["warnings"]) if d.get("warnings") else []
    d["uncertain"] = bool(d["uncertain"]) if d.get("uncertain") is not None else None
    return d


def _since(since) -> str | None:
    if since is None or since == "":
        return None
    if isinstance(since, _dt.datetime):
        return since.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")
    if isinstance(since, _dt.date):
        return since.isoformat()
    try:
        return _dt.date.fromisoformat(str(since)).isoformat()
    except ValueError:
        try:
            return _dt.datetime.fromisoformat(str(since)).isoformat(timespec="seconds")
        except ValueError:
            raise HistoryError(f"--since {since!r} is not a date: use YYYY-MM-DD.") from None


def list_records(db: str | Path | None = None, *, patient: str | None = None, since=None,
                 organ: str | None = None, status: str | None = None,
                 limit: int | None = None, user: str | None = None) -> list[dict]:
    """Records, newest first. ``patient`` matches the pseudonym or a stored raw patient ID;
    ``since``: a date (YYYY-MM-DD) or datetime, compared with the recording time (UTC);
    ``user``: only the cases this web-app user ran (``list_records(user="alice")``)."""
    where, args = [], []
    if user:
        where.append("user_id = ?")
        args.append(user)
    if patient:
        where.append("(patient = ? OR patient_id = ?)")
        args += [patient, patient]
    if (s := _since(since)) is not None:
        where.append("recorded >= ?")
        args.append(s)
    if organ:
        where.append("organ = ?")
        args.append(organ)
    if status:
        where.append("status = ?")
        args.append(status)
    sql = "SELECT * FROM analyses" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    if not _resolve(db).exists():
        return []
    with _connect(db) as (con, _):
        return [_row(r) for r in con.execute(sql, args)]


def get(record_id: int, db: str | Path | None = None) -> dict:
    """One record by id; :class:`HistoryError` when there is none."""
    with _connect(db, create=False) as (con, path):
        r = con.execute("SELECT * FROM analyses WHERE id = ?", (int(record_id),)).fetchone()
    if r is None:
        raise HistoryError(f"No record {record_id} in the case history {path} "
                           "(see `dicompipe history list`).")
    return _row(r)


def export_csv(dest=None, db: str | Path | None = None, **filters) -> int:
    """Write the records (filters as :func:`list_records`) as CSV; return the row count.

    ``dest``: a file path (written atomically), a text stream, or None/"-" for stdout.
    """
    rows = list_records(db, **filters)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        r = dict(r, probabilities=json.dumps(r["probabilities"]), warnings=json.dumps(r["warnings"]))
        w.writerow(r)
    text = buf.getvalue()
    if dest is None or dest == "-":
        sys.stdout.write(text)
    elif hasattr(dest, "write"):
        dest.write(text)
    else:
        from dicompipe.util import write_text
        try:
            write_text(Path(dest), text)
        except OSError as e:
            raise HistoryError(f"Cannot write the CSV export {dest}: {e.strerror or e}.") from e
    return len(rows)


# --------------------------------------------------------------------------- CLI
def _fmt_probs(p: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in p.items())


def list_text(rows: list[dict], db=None) -> str:
    """``dicompipe history list``'s table of ``rows`` (from :func:`list_records`).

    >>> print(list_text(list_records(organ="lung")))
    """
    if not rows:
        return f"No records in {_resolve(db)}."
    lines = [f"{'id':>5}  {'recorded':<20} {'status':<6} {'patient':<14} {'organ':<8} "
             f"{'verdict':<16} probabilities"]
    for r in rows:
        verdict = (r["label"] or "-") + ("?" if r["uncertain"] else "")
        lines.append(f"{r['id']:>5}  {r['recorded'][:19]:<20} {r['status']:<6} "
                     f"{(r['patient'] or '-'):<14} {(r['organ'] or '-'):<8} {verdict:<16} "
                     f"{_fmt_probs(r['probabilities'])}")
    lines.append(f"({len(rows)} record(s); '?' = uncertain; database {_resolve(db)})")
    return "\n".join(lines)


def record_text(r: dict) -> str:
    """``dicompipe history show``'s view of one record (from :func:`get`).

    >>> print(record_text(get(1)))
    """
    lines = []
    for k in COLUMNS:
        v = r.get(k)
        if k == "probabilities":
            v = _fmt_probs(v)
        elif k == "warnings":
            v = "; ".join(v) or "-"
        lines.append(f"{k + ':':<15}{'-' if v in (None, '') else v}")
    return "\n".join(lines)
