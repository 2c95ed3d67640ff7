"""Cohorts: analyse many studies on one machine or a Dask cluster, resumably.

One task per study, run by :func:`dicompipe.pipeline.run_case` in a Dask worker that keeps
one :class:`~dicompipe.pipeline.Analyzer` (bundles and compiled backends loaded once per
worker process). Without a scheduler address a ``LocalCluster`` of worker processes (one
task thread each) is started on this machine; with one, the same code runs on that cluster.

Each study is first hashed on a worker (headers + the chosen series' bytes, the history's
``input_hash``) and only then analysed, so a re-run skips what is already done:

- a study whose row (same name) has status ``done`` for the same content hash, requested
  organ and model is skipped;
- a study whose content matches another study's finished row (a copy under another name,
  in this run or an earlier one) is not analysed again: it gets a ``duplicate`` row that
  copies that result and names it in ``duplicate_of`` (the first copy to be hashed wins);
- ``error`` rows are retried on a re-run (a broken study fails fast; a worker that died of
  memory gets another chance) and replaced by the new row;
- a study whose files still have the names, sizes and modification times of its finished
  row (``fingerprint``) keeps that row's hash without being read again, as make and rsync
  decide (``rehash=True``, ``--rehash``, reads every study again).

The analysis of a study is sent to the worker that hashed it when it is free (its files
are then in that machine's page cache).

Results go to ``OUT/results.jsonl`` (one line per finished study, appended and flushed as
each finishes, so a crash or Ctrl-C keeps every finished row) and are rewritten atomically
as ``OUT/results.csv`` and ``OUT/results.parquet``; run folders go to
``OUT/runs/<study>/<UTC time>_<organ>/``; every analysed study is recorded in the case
history (``history``) by ``run_case``.

Example::

    >>> from dicompipe import batch
    >>> df = batch.run("cohort/", out="cohort-out", organ="lung", workers=2)
    >>> df[["study", "status", "verdict", "p_malignant"]]
    >>> batch.run("cohort/", out="cohort-out", organ="lung")     # again: every row skipped
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dicompipe import organs
from dicompipe.errors import BatchError, DicompipeError
from dicompipe.util import atomic_path, cpu_count, physical_cores

#: memory one worker may need for a typical CT (512 x 512 x ~300 peaks at ~1.7 GB)
WORKER_MEMORY = int(2.5 * 2**30)
JOURNAL = "results.jsonl"
CSV = "results.csv"
PARQUET = "results.parquet"
#: the tables are rewritten at most this often (seconds); the journal gets every row at once
WRITE_EVERY_S = 2.0
STATUSES = ("done", "error", "duplicate")
#: the table's columns, in order (``p_<label>`` probability columns follow ``confidence``)
COLUMNS = ("study", "status", "organ", "verdict", "uncertain", "assessable", "confidence",
           "ood_slices_out", "ood_slices", "n_slices", "series_uid", "series_key",
           "input_hash", "fingerprint", "organ_requested", "model_requested", "model", "run_dir",
           "error", "duplicate_of", "worker", "warm", "t_hash", "t_load", "t_predict",
           "t_analyze", "t_report", "t_task", "peak_rss_mb", "finished")
#: what a duplicate row copies from the row of the study it duplicates
_RESULT_KEYS = ("organ", "verdict", "uncertain", "assessable", "confidence", "ood_slices_out",
                "ood_slices", "n_slices", "series_uid", "series_key", "model", "run_dir")
_STUDY_SUFFIXES = (".zip", ".nii", ".nii.gz")


# --------------------------------------------------------------------------- studies
@dataclass(frozen=True)
class Study:
    """One study of a cohort: ``name`` (unique in the cohort, the table's key), ``path``
    (a folder, zip, DICOM or NIfTI file) and optional per-study ``organ`` and ``series``.

    >>> Study("case-001", "/data/cohort/case-001", organ="lung")
    """

    name: str
    path: str
    organ: str | None = None
    series: str | None = None


def find_studies(root: str | Path) -> list[Study]:
    """Every folder, zip or NIfTI file directly under ``root`` (hidden ones skipped), by name.

    >>> [s.name for s in find_studies("cohort/")]
    ['case-001', 'case-002.zip']
    """
    root = Path(root)
    if not root.is_dir():
        raise BatchError(f"{root} is not a folder of studies (nor a .csv manifest).")
    out = []
    for p in sorted(root.iterdir(), key=lambda p: p.name):
        if p.name.startswith("."):
            continue
        if p.is_dir() or (p.is_file() and p.name.lower().endswith(_STUDY_SUFFIXES)):
            out.append(Study(p.name, str(p.resolve())))
    if not out:
        raise BatchError(f"No studies under {root}: a study is a folder, .zip or NIfTI file "
                         "directly under it. To analyse one study use `dicompipe analyze`.")
    return out


def read_manifest(path: str | Path) -> list[Study]:
    """Studies from a CSV with a ``path`` column and optional ``study``, ``organ`` and
    ``series`` columns; relative paths are relative to the manifest's folder.

    >>> read_manifest("cohort.csv")      # path,organ\\n a/,lung\\n b.zip,pancreas
    [Study(name='a', path='/data/a', organ='lung', series=None), ...]
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BatchError(f"Cannot read the manifest {path}: {e}.") from e
    known = {*organs.names(), "auto"}
    out = []
    for n, raw in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k}
        if not row.get("path"):
            raise BatchError(f"{path} line {n}: no path (the manifest needs a 'path' column; "
                             "optional: study, organ, series).")
        organ = row.get("organ") or None
        if organ and organ not in known:
            raise BatchError(f"{path} line {n}: organ {organ!r} is not one of "
                             f"{', '.join(sorted(known))}.")
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        out.append(Study(row.get("study") or row["path"], str(p.resolve()), organ,
                         row.get("series") or None))
    if not out:
        raise BatchError(f"The manifest {path} lists no studies.")
    return _unique(out, hint="give each row a distinct 'study' name")


def collect(studies) -> list[Study]:
    """``studies`` as a list of :class:`Study`: a folder of studies, a ``.csv`` manifest,
    or a list of paths, ``Study`` objects or dicts with ``path`` (and ``study``/``name``,
    ``organ``, ``series``).

    >>> collect(["a/", "b.zip"])
    [Study(name='a', path='/data/a', ...), Study(name='b.zip', ...)]
    """
    if isinstance(studies, (str, Path)):
        p = Path(studies)
        if p.suffix.lower() == ".csv" and p.is_file():
            return read_manifest(p)
        return find_studies(p)
    out = []
    for s in studies:
        if isinstance(s, Study):
            out.append(s)
        elif isinstance(s, dict):
            real = Path(s["path"]).expanduser().resolve()
            out.append(Study(s.get("study") or s.get("name") or real.name, str(real),
                             s.get("organ"), s.get("series")))
        else:
            real = Path(s).expanduser().resolve()
            out.append(Study(real.name, str(real)))
    if not out:
        raise BatchError("No studies given.")
    return _unique(out, hint="pass Study objects or a manifest with distinct 'study' names")


def _unique(studies: list[Study], hint: str) -> list[Study]:
    seen: dict[str, int] = {}
    for s in studies:
        seen[s.name] = seen.get(s.name, 0) + 1
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise BatchError(f"{len(dup)} study name(s) appear more than once (e.g. {dup[0]!r}); "
                         f"names key the results table: {hint}.")
    return studies


def _check_out(out: Path, studies: list[Study]) -> None:
    """dicompipe never writes into its input: refuse an output folder inside a study."""
    real = out.resolve()
    for s in studies:
        src = Path(s.path)
        if src.is_dir() and (real == src or src in real.parents):
            raise BatchError(f"The output folder {out} lies inside the study {s.name!r}; "
                             "dicompipe never writes into its input. Choose --out elsewhere.")


# --------------------------------------------------------------------------- the table
class ResultTable:
    """The cohort's results under ``out``: one row per study (the latest), read back from
    the journal on start, appended to it as each study finishes, and rewritten atomically
    as CSV and Parquet (at most every ``WRITE_EVERY_S`` seconds, and by :meth:`write`).

    >>> t = ResultTable("cohort-out")
    >>> t.add({"study": "a", "status": "done", ...})
    >>> t.write(); t.frame()
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.rows: dict[str, dict] = {}
        self.unreadable = 0                  # journal lines a crash cut short
        self._written = 0.0
        self._results: dict[tuple, dict] = {}     # (hash, organ, model) -> a row with the result
        for row in _read_journal(self.out / JOURNAL, self):
            self._keep(row)
        _end_line(self.out / JOURNAL)

    def _keep(self, row: dict) -> None:
        old = self.rows.get(row["study"])
        self.rows[row["study"]] = row
        if old is not None and self._results.get(_key(old)) is old:   # rare: a study redone
            del self._results[_key(old)]
            for r in self.rows.values():
                self._index(r)
        self._index(row)

    def _index(self, row: dict) -> None:
        if row.get("status") in ("done", "duplicate") and row.get("input_hash"):
            self._results.setdefault(_key(row), row)

    def add(self, row: dict) -> None:
        """Keep ``row`` (replacing the study's earlier one) and append it to the journal."""
        self._keep(row)
        with open(self.out / JOURNAL, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if time.monotonic() - self._written >= WRITE_EVERY_S:
            self.write()

    def finished(self, key: tuple) -> dict | None:
        """A row whose result stands for ``key`` (hash, organ, model): done, or a duplicate
        of a done one."""
        return self._results.get(key)

    def frame(self):
        """The table as a pandas DataFrame (columns in :data:`COLUMNS` order)."""
        pd = _need("pandas")
        rows = list(self.rows.values())
        probs = sorted({k for r in rows for k in r if k.startswith("p_")})
        at = COLUMNS.index("confidence") + 1
        cols = [*COLUMNS[:at], *probs, *COLUMNS[at:]]
        extra = sorted({k for r in rows for k in r} - set(cols))
        return pd.DataFrame(rows, columns=cols + extra)

    def write(self) -> None:
        """Rewrite results.csv and results.parquet atomically from the rows."""
        df = self.frame()
        with atomic_path(self.out / CSV) as tmp:
            df.to_csv(tmp, index=False)
        _need("pyarrow")
        with atomic_path(self.out / PARQUET) as tmp:
            df.to_parquet(tmp, index=False)
        self._written = time.monotonic()


def _read_journal(path: Path, table: ResultTable) -> Iterator[dict]:
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                table.unreadable += 1
                continue
            if isinstance(row, dict) and row.get("study"):
                yield row


def _end_line(path: Path) -> None:
    """End a journal that a crash cut in the middle of a line, so the next row starts
    on a line of its own."""
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
    except FileNotFoundError:
        pass


def _key(row: dict) -> tuple:
    return (row.get("input_hash"), row.get("organ_requested"), row.get("model_requested") or "")


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One batch at a time per output folder (fcntl lock; none where there is no fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out / ".batch.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BatchError(f"Another dicompipe batch is writing to {out}; wait for it or "
                             "choose another --out.") from None
        yield


# --------------------------------------------------------------------------- worker tasks
#: per worker process: settings -> Analyzer (bundles and compiled backends kept)
_ANALYZERS: dict[str, object] = {}


def _analyzer(settings: dict):
    key = json.dumps(settings, sort_keys=True, default=str)
    if key not in _ANALYZERS:
        from dicompipe.pipeline import Analyzer
        _ANALYZERS[key] = Analyzer(**settings)
    return _ANALYZERS[key]


def _message(e: BaseException, study: Study, include_phi: bool) -> str:
    """An error's message, the study's path replaced by ``<input>`` unless ``include_phi``."""
    text = str(e) if isinstance(e, DicompipeError) else f"{type(e).__name__}: {e}"
    if include_phi:
        return text
    from dicompipe.phi import Redactor
    return Redactor(roots=[study.path]).text(text)


def _worker_row() -> dict:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"worker": f"{socket.gethostname()}:{os.getpid()}",
            "peak_rss_mb": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def fingerprint(path: str | Path) -> str | None:
    """sha256 over the relative name, size and modification time of every file under
    ``path`` (or of the file): what tells a re-run that a study is unchanged without
    reading it. None when it cannot be listed.

    >>> fingerprint("cohort/case-001")
    '9b1c...'
    """
    root = Path(path)
    h = hashlib.sha256()
    try:
        files = [root] if root.is_file() else sorted(
            Path(d, f) for d, _, names in os.walk(root) for f in names)
        for f in files:
            st = f.lstat()
            h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    except OSError:
        return None
    return h.hexdigest()


def hash_task(study: Study, include_phi: bool = False, known: tuple | None = None) -> dict:
    """On a worker: the study's content hash (:func:`dicompipe.pipeline.content_hash`), or
    its error. ``known``: (fingerprint, hash) of the study's earlier result; when its files'
    names, sizes and times still match, that hash is returned without reading them.
    Returns ``{"input_hash", "fingerprint", "t_hash", "at"}`` or ``{"error"}``."""
    t0 = time.perf_counter()
    fp = fingerprint(study.path)
    if known and fp is not None and known[0] == fp:
        return {"input_hash": known[1], "fingerprint": fp, "t_hash": 0.0, "at": _here()}
    try:
        from dicompipe.pipeline import content_hash
        h = content_hash(study.path, series=study.series)
    except Exception as e:  # noqa: BLE001 - becomes the study's error row
        return {"error": _message(e, study, include_phi)}
    if h is None:
        return {"error": "The chosen series' files cannot be read (no content hash)."}
    return {"input_hash": h, "fingerprint": fp, "t_hash": round(time.perf_counter() - t0, 3),
            "at": _here()}


def _here() -> str | None:
    """This Dask worker's address (the analysis goes there too: the files are in its page
    cache), None outside a worker."""
    try:
        from distributed import get_worker
        return get_worker().address
    except (ImportError, ValueError):
        return None


def analyse_task(study: Study, organ: str, run_parent: str, settings: dict) -> dict:
    """On a worker: ``run_case`` of one study with this worker's cached Analyzer; the
    result row (status ``done``, or ``error`` with the message). Never raises."""
    t0 = time.perf_counter()
    row: dict = {"study": study.name, "organ_requested": organ,
                 "model_requested": str(settings.get("model") or "")}
    include_phi = bool(settings.get("include_phi"))
    try:
        analyzer = _analyzer(settings)
        loaded = set(analyzer.bundles)            # organs whose bundle this worker holds
        res = analyzer.run_case(study.path, organ=organ, series=study.series, out=run_parent)
    except Exception as e:  # noqa: BLE001 - becomes the study's error row
        row.update(status="error", error=_message(e, study, include_phi))
    else:
        row.update(_result_columns(res), warm=res.analysis.organ in loaded)
        errors = [_message(e, study, include_phi) for e in res.errors]
        row.update(status="done" if res.run_dir else "error", error="; ".join(errors) or None)
    row.update(_worker_row(), t_task=round(time.perf_counter() - t0, 3))
    if row.get("t_analyze") is not None:          # reports + history (+ a first bundle load)
        row["t_report"] = round(row["t_task"] - row["t_analyze"], 3)
    return row


def _result_columns(res) -> dict:
    a = res.analysis
    v = a.verdict
    ood = v.ood if v.ood is not None and v.ood.available else None
    analyse_s = sum(a.timings.values())
    return {
        "organ": a.organ, "verdict": v.label, "uncertain": bool(v.uncertain),
        "assessable": bool(v.assessable),
        "confidence": v.confidence.status if v.confidence is not None else None,
        **{f"p_{k}": round(float(p), 6) for k, p in v.probabilities.items()},
        "ood_slices_out": len(ood.out_rows) if ood else None,
        "ood_slices": len(ood.scores) if ood else None,
        "n_slices": v.n_slices, "series_uid": a.series.series_instance_uid,
        "t_load": round(a.timings.get("discover", 0) + a.timings.get("load", 0), 3),
        "t_predict": a.timings.get("predict"),
        "series_key": a.series.key,
        "model": f"{a.model.get('name')} {a.model.get('version')}" if a.model else None,
        "run_dir": str(res.run_dir) if res.run_dir else None,
        "t_analyze": round(analyse_s, 3),
    }


# --------------------------------------------------------------------------- the cluster
def default_workers(memory_per_worker: int = WORKER_MEMORY) -> int:
    """Workers for a local cluster: min(physical cores, available memory / per worker), >= 1.

    >>> default_workers()
    2
    """
    from dicompipe.io.limits import available_memory
    return max(1, min(physical_cores(), int(available_memory() // memory_per_worker)))


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Worker processes started inside inherit an ignored SIGINT, so Ctrl-C in a terminal
    reaches only this process, which stops the batch cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def local_cluster(workers: int | None = None, *, dashboard: bool = True):
    """A Dask ``LocalCluster`` of ``workers`` processes (default :func:`default_workers`),
    one task thread each, the cores shared out through ``$DICOMPIPE_THREADS``; its worker
    processes ignore Ctrl-C (the batch stops them). What :func:`run` starts without a
    scheduler; start one yourself to keep it for several runs.

    >>> with local_cluster(2) as cluster:
    ...     run("cohort/", out="o", scheduler=cluster)
    """
    import logging

    distributed = _need("distributed")
    n = workers or default_workers()
    if n < 1:
        raise BatchError(f"--workers must be at least 1, got {n}.")
    threads = str(max(1, cpu_count() // n))
    with _sigint_ignored():
        return distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True,
            dashboard_address=":8787" if dashboard else None, silence_logs=logging.ERROR,
            env={"DICOMPIPE_THREADS": threads, "OMP_NUM_THREADS": threads})


def _start(scheduler, workers: int | None, dashboard: bool):
    """(client, what to close): a client of ``scheduler`` (an address, a Dask cluster or
    client) or of a new LocalCluster."""
    distributed = _need("distributed")
    if isinstance(scheduler, distributed.Client):
        return scheduler, []
    if scheduler is not None and not isinstance(scheduler, str):
        return distributed.Client(scheduler), []             # a cluster object
    if scheduler:
        try:
            c = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise BatchError(f"Cannot reach the Dask scheduler at {scheduler}: {e}. Is "
                             "`dask scheduler` running there, and the port open?") from e
        return c, [c]
    cluster = local_cluster(workers, dashboard=dashboard)
    c = distributed.Client(cluster)
    return c, [c, cluster]


def _dashboard(client, dashboard: bool) -> str | None:
    """The dashboard's address when one is up (it needs bokeh)."""
    import importlib.util
    if not dashboard or importlib.util.find_spec("bokeh") is None:
        return None
    try:
        return client.dashboard_link if "dashboard" in client.scheduler_info()["services"] else None
    except Exception:  # noqa: BLE001 - no link is fine
        return None


# --------------------------------------------------------------------------- run
def run(studies, *, out: str | Path, organ: str = "auto", formats=None,
        history: str | Path | bool | None = None, scheduler=None,
        workers: int | None = None, model: str | Path | None = None, limit: int | None = None,
        rehash: bool = False, progress: bool = True, dashboard: bool = True, include_phi: bool = False,
        allow_untrained: bool = False, **options):
    """Analyse a cohort; return the results table (a pandas DataFrame, every row under
    ``out``, also earlier runs'); ``df.attrs["summary"]`` counts what this run did.

    ``studies``: a folder of studies, a .csv manifest, or a list (see :func:`collect`);
    ``organ``: for studies that do not name one; ``formats``, ``history``, ``include_phi``
    and ``options`` (backend, device, cam, config, batch_size, max_memory, ...) go to
    :func:`dicompipe.pipeline.run_case`; ``model``: a bundle name or folder (a path every
    worker can read); ``scheduler``: a Dask scheduler address (else a LocalCluster of
    ``workers`` processes, default :func:`default_workers`); ``limit``: analyse at most this
    many studies now (the rest on a later run); ``rehash``: read every study again to hash
    it (by default a study whose files' names, sizes and times match its finished row's
    ``fingerprint`` keeps that row's hash unread); ``progress``: a bar on stderr.
    Ctrl-C cancels the rest, keeps every finished row and raises KeyboardInterrupt.

    >>> df = run("cohort/", out="cohort-out", organ="lung", formats="json,txt", workers=2)
    >>> df.attrs["summary"]
    {'studies': 50, 'analysed': 50, 'skipped': 0, 'duplicates': 0, 'errors': 0, ...}
    """
    items = collect(studies)
    if organ not in {*organs.names(), "auto"}:
        raise BatchError(f"organ {organ!r} is not one of {', '.join(organs.names())} or auto.")
    if model is not None and not isinstance(model, (str, Path)):
        raise BatchError("model must be a bundle name or folder (workers load it themselves).")
    if limit is not None and limit < 0:
        raise BatchError(f"limit must be >= 0, got {limit}.")
    _need("pandas")
    out = Path(out).expanduser().resolve()
    _check_out(out, items)
    root = Path(studies).resolve() if isinstance(studies, (str, Path)) else None
    if root is not None and root.is_dir() and (out == root or root in out.parents):
        raise BatchError(f"The output folder {out} lies inside the folder of studies {root}: "
                         "dicompipe never writes into its input. Choose --out elsewhere.")
    from dicompipe.report import parse_formats
    settings = dict(options, formats=parse_formats(formats), history=_plain_history(history),
                    include_phi=include_phi, allow_untrained=allow_untrained,
                    model=str(model) if model is not None else None)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"Cannot create the output folder {out}: {e.strerror or e}.") from e
    with _lock(out):
        table = ResultTable(out)
        client, to_close = _start(scheduler, workers, dashboard)
        bar = None
        try:
            link = _dashboard(client, dashboard)
            if progress and link:
                print(f"Dask dashboard: {link}", file=sys.stderr)
            bar = _bar(len(items), progress)
            summary = _drive(client, items, table, settings, organ, out, limit, bar, rehash)
            summary["dashboard"] = link
        finally:
            if bar is not None:
                bar.close()
            table.write()
            for x in to_close:
                x.close()
    df = table.frame()
    df.attrs["summary"] = summary
    return df


def _plain_history(history):
    """A history path every worker can use (absolute), or None/True/False as given."""
    if isinstance(history, (str, Path)) and not isinstance(history, bool):
        return str(Path(history).expanduser().resolve())
    return history


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, file=sys.stderr, unit="study", dynamic_ncols=True)


def _drive(client, items: list[Study], table: ResultTable, settings: dict, organ: str,
           out: Path, limit: int | None, bar, rehash: bool = False) -> dict:
    """Submit the hash tasks, then an analysis per study that needs one; write each row as
    it finishes. Returns the counts."""
    from distributed import as_completed

    t0 = time.perf_counter()
    count: dict = dict(studies=len(items), analysed=0, skipped=0, duplicates=0, errors=0, left=0)
    include_phi = bool(settings["include_phi"])
    model = settings["model"] or ""
    tag = uuid.uuid4().hex[:8]
    meta: dict = {}                   # future key -> (kind, study, requested organ, hash row)
    waiting: dict[tuple, list] = {}   # key being analysed -> [(study, hash row) copies]
    hashing = []
    ac = as_completed()
    for i, s in enumerate(items):
        prev = table.rows.get(s.name) or {}
        known = None
        if not rehash and prev.get("status") in ("done", "duplicate") and prev.get("fingerprint"):
            known = (prev["fingerprint"], prev["input_hash"])
        f = client.submit(hash_task, s, include_phi, known, key=f"dicompipe-hash-{tag}-{i}",
                          priority=0)
        meta[f.key] = ("hash", s, s.organ or organ, None)
        hashing.append(f)
        ac.add(f)
    submitted = 0

    def finish(row: dict, outcome: str) -> None:
        table.add(row)
        count[outcome] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(done=count["analysed"], skipped=count["skipped"],
                            dup=count["duplicates"], errors=count["errors"], refresh=False)

    try:
        for fut in ac:
            kind, study, req, hrow = meta.pop(fut.key)
            if fut.cancelled():
                count["left"] += 1
                if bar is not None:
                    bar.update(1)
                continue
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - a worker died (memory?), a lost task
                res = {"error": "The task failed on the cluster: " + _message(e, study, include_phi)}
            base = {"study": study.name, "organ_requested": req, "model_requested": model}
            if kind == "hash":
                at = res.pop("at", None)
                key = (res.get("input_hash"), req, model)
                if "error" in res:
                    finish({**base, "status": "error", **res, **_client_row()}, "errors")
                    continue
                mine = table.rows.get(study.name)
                if mine and mine.get("status") in ("done", "duplicate") and _key(mine) == key:
                    count["skipped"] += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                if key in waiting:
                    waiting[key].append((study, res))
                    continue
                prior = table.finished(key)
                if prior is not None:
                    finish(_duplicate(base, res, prior), "duplicates")
                    continue
                if limit is not None and submitted >= limit:
                    count["left"] += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                f = client.submit(analyse_task, study, req, str(out / "runs" / _slug(study.name)),
                                  settings, key=f"dicompipe-case-{tag}-{study.name}", priority=10,
                                  workers=[at] if at else None, allow_other_workers=True)
                meta[f.key] = ("case", study, req, res)
                waiting[key] = []
                submitted += 1
                ac.add(f)
                if limit is not None and submitted >= limit:     # the rest: a later run
                    client.cancel([h for h in hashing if not h.done()])
            else:
                row = {**base, **res, "input_hash": hrow.get("input_hash"),
                       "fingerprint": hrow.get("fingerprint"), "t_hash": hrow.get("t_hash")}
                row.setdefault("status", "error")
                finish(row, "analysed" if row["status"] == "done" else "errors")
                for dup, dres in waiting.pop(_key(row), []):
                    dbase = {**base, "study": dup.name}
                    if row["status"] == "done":
                        finish(_duplicate(dbase, dres, row), "duplicates")
                    else:
                        finish({**dbase, **dres, "status": "error", "duplicate_of": study.name,
                                "error": f"Same content as {study.name!r}, which failed: "
                                         f"{row.get('error')}"}, "errors")
    except KeyboardInterrupt:
        client.cancel([f for f in hashing if not f.done()])
        print(f"\ndicompipe batch: interrupted; {len(table.rows)} row(s) kept in "
              f"{out / CSV}. Run the same command again to continue.", file=sys.stderr)
        raise
    count["wall_s"] = round(time.perf_counter() - t0, 2)
    count["workers"] = len(client.scheduler_info().get("workers", {}))
    return count


def _duplicate(base: dict, hash_row: dict, prior: dict) -> dict:
    """A row for a study whose content is ``prior``'s: its result, not analysed again."""
    copied = {k: prior.get(k) for k in _RESULT_KEYS}
    copied.update({k: v for k, v in prior.items() if k.startswith("p_")})
    return {**base, **hash_row, **copied, "status": "duplicate",
            "duplicate_of": prior.get("duplicate_of") or prior["study"], **_client_row()}


def _client_row() -> dict:
    return {"finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "study"


def _need(module: str):
    """Import an optional dependency of the batch, or say which extra provides it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BatchError(f"dicompipe batch needs {module} ({e}): pip install 'dicompipe[batch]'.") from e

