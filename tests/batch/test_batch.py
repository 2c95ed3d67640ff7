"""dicompipe.batch: a cohort on a LocalCluster of 2 processes and on an external `dask
scheduler` + `dask worker`, resumed after a partial run, with a broken study and a copy of
another study (same content, another name: analysed once, the copy gets a "duplicate" row).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synth import tree_hash, write_ct_series
from tiny_bundle import chest_phantom, make_bundle

pd = pytest.importorskip("pandas")
pytest.importorskip("distributed")
pytest.importorskip("pyarrow")

from dicompipe import batch, history  # noqa: E402
from dicompipe.cli import main  # noqa: E402
from dicompipe.errors import BatchError  # noqa: E402
from dicompipe.types import PreprocessSpec  # noqa: E402

SPEC = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)], size=64,
                      slab_mm=5.0)
SHAPE = (8, 48, 48)
#: what every analysis in these tests is given (tiny shapes, the tiny untrained bundle)
FAST = dict(organ="lung", formats="json", backend="torch", device="cpu", allow_untrained=True,
            progress=False, dashboard=False)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "lung", organ="lung", spec=SPEC,
                       favour="malignant")


def _study(folder: Path, seed: int) -> None:
    hu = chest_phantom(SHAPE, lung_z=(0.0, 1.0), seed=seed)
    write_ct_series(folder, shape=SHAPE, spacing=(0.8, 0.8, 2.5), origin=(-19.0, -19.0, -100.0),
                    hu=hu + np.float32(seed), body_part="CHEST", names="dcm")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 studies: 4 distinct, a copy of case-2 under another name, and a broken one."""
    root = tmp_path_factory.mktemp("cohort") / "root"
    for i in range(1, 5):
        _study(root / f"case-{i}", seed=i)
    shutil.copytree(root / "case-2", root / "case-2-copy")
    (root / "broken").mkdir()
    (root / "broken" / "notes.txt").write_text("not a CT\n")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- no cluster
def test_find_studies_and_manifest(tmp_path, cohort):
    assert [s.name for s in batch.find_studies(cohort)] == [
        "broken", "case-1", "case-2", "case-2-copy", "case-3", "case-4"]
    m = tmp_path / "cohort.csv"
    m.write_text(f"path,organ,study\n{cohort / 'case-1'},lung,a\n../x/y.zip,,\n")
    got = batch.read_manifest(m)
    assert got[0] == batch.Study("a", str(cohort / "case-1"), "lung", None)
    assert got[1].name == "../x/y.zip" and got[1].path == str((tmp_path / "../x/y.zip").resolve())
    assert batch.collect(m) == got
    m.write_text("path,organ\na,brain\n")
    with pytest.raises(BatchError, match="line 2: organ 'brain'"):
        batch.read_manifest(m)
    with pytest.raises(BatchError, match="more than once"):
        batch.collect([cohort / "case-1", tmp_path / "case-1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BatchError, match="No studies under"):
        batch.find_studies(tmp_path / "empty")


def test_out_inside_the_input_is_refused(cohort):
    with pytest.raises(BatchError, match="never writes into its input"):
        batch.run(cohort, out=cohort / "results", **FAST)
    assert not (cohort / "results").exists()


def test_journal_survives_a_cut_last_line(tmp_path):
    t = batch.ResultTable(tmp_path)
    t.add({"study": "a", "status": "done", "input_hash": "h", "organ_requested": "lung",
           "model_requested": "", "p_malignant": 0.9})
    with open(tmp_path / batch.JOURNAL, "a") as fh:
        fh.write('{"study": "b", "sta')                  # a crash in the middle of a line
    t2 = batch.ResultTable(tmp_path)
    assert list(t2.rows) == ["a"] and t2.unreadable == 1
    assert t2.finished(("h", "lung", "")) is not None
    t2.add({"study": "c", "status": "duplicate", "input_hash": "h", "organ_requested": "lung",
            "model_requested": "", "duplicate_of": "a"})
    t2.add({"study": "a", "status": "error", "input_hash": "h", "organ_requested": "lung",
            "model_requested": "", "error": "changed"})          # a redone, failed
    assert t2.finished(("h", "lung", ""))["study"] == "c"           # c still holds the result
    assert t2.finished(("h", "pancreas", "")) is None
    t2.add({"study": "a", "status": "done", "input_hash": "h", "organ_requested": "lung",
            "model_requested": "", "p_malignant": 0.9})
    t2.write()
    df = pd.read_parquet(tmp_path / batch.PARQUET)
    assert list(df.study) == ["a", "c"] and list(df.columns[:3]) == ["study", "status", "organ"]
    assert list(df.status) == ["done", "duplicate"] and df.p_malignant[0] == 0.9
    assert pd.read_csv(tmp_path / batch.CSV).shape[0] == 2
    assert list(batch.ResultTable(tmp_path).rows) == ["a", "c"]     # the journal says the same


def test_hash_task_trusts_an_unchanged_fingerprint_only(tmp_path):
    study = tmp_path / "s"
    _study(study, seed=9)
    s = batch.Study("s", str(study))
    first = batch.hash_task(s)
    assert first["input_hash"] and first["fingerprint"] == batch.fingerprint(study)
    assert first["at"] is None                                 # not inside a Dask worker
    # unchanged names, sizes and times: the earlier hash is taken without reading the files
    assert batch.hash_task(s, known=(first["fingerprint"], "earlier"))["input_hash"] == "earlier"
    f = sorted(study.iterdir())[0]
    before = tree_hash(study)
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))   # "touched"
    assert tree_hash(study) != before
    again = batch.hash_task(s, known=(first["fingerprint"], "earlier"))
    assert again["input_hash"] == first["input_hash"] and again["fingerprint"] != first["fingerprint"]
    bad = batch.hash_task(batch.Study("x", str(tmp_path / "missing")))
    assert set(bad) == {"error"} and str(tmp_path) not in bad["error"]


def test_default_workers_is_at_least_one():
    assert 1 <= batch.default_workers() <= os.cpu_count()
    assert batch.default_workers(memory_per_worker=1 << 60) == 1


# --------------------------------------------------------------------------- LocalCluster
@pytest.fixture(scope="module")
def cluster():
    """The LocalCluster run() starts (2 worker processes), kept for the module's runs."""
    with batch.local_cluster(2, dashboard=False) as c:
        yield c


@pytest.mark.slow
def test_local_cluster_resumes_dedups_and_keeps_errors(tmp_path, cohort, bundle, cluster):
    before = tree_hash(cohort)
    out, db = tmp_path / "out", tmp_path / "history.sqlite"
    # an interrupted batch: only 2 studies analysed (the rest "left"), then run again
    first = batch.run(cohort, out=out, model=bundle, history=db, scheduler=cluster, limit=2, **FAST)
    s1 = first.attrs["summary"]
    assert s1["analysed"] == 2 and s1["workers"] == 2
    assert s1["analysed"] + s1["errors"] + s1["duplicates"] + s1["left"] + s1["skipped"] == 6
    done_first = set(first.study[first.status == "done"])

    df = batch.run(cohort, out=out, model=bundle, history=db, scheduler=cluster, **FAST)
    s2 = df.attrs["summary"]
    # resumed: nothing redone (the 2 analysed, and a duplicate row if the copy was reached)
    assert s2["skipped"] == first.status.isin(["done", "duplicate"]).sum() >= 2
    assert tree_hash(cohort) == before                         # input never modified
    rows = df.set_index("study")
    assert sorted(rows.index) == ["broken", "case-1", "case-2", "case-2-copy", "case-3", "case-4"]
    assert rows.status.value_counts().to_dict() == {"done": 4, "duplicate": 1, "error": 1}
    # the copy of case-2: analysed once, the other name points at it with its result
    dup = rows[rows.status == "duplicate"].iloc[0]
    assert {dup.name, dup.duplicate_of} == {"case-2", "case-2-copy"}
    assert dup.input_hash == rows.loc[dup.duplicate_of, "input_hash"]
    assert dup.p_malignant == rows.loc[dup.duplicate_of, "p_malignant"]
    # the broken study: an error row with its message, no input path in it
    err = rows.loc["broken"]
    assert "No" in err.error and str(cohort) not in err.error and pd.isna(err.run_dir)
    done = rows[rows.status == "done"]
    assert set(done.index) >= done_first
    assert (done.verdict == "malignant").all() and (done.organ == "lung").all()
    assert done.p_malignant.between(0.5, 1).all() and done.n_slices.gt(0).all()
    for d in done.run_dir:
        assert (Path(d) / "analysis.json").is_file() and Path(d).is_relative_to(out / "runs")
    assert done.t_analyze.gt(0).all() and done.peak_rss_mb.gt(50).all()
    # the model is loaded once per worker process (kept across runs on the same cluster)
    assert (~done.warm.astype(bool)).sum() <= 2 and done.worker.nunique() <= 2
    # the tables on disk are the returned one; the history has each analysed study once
    assert pd.read_parquet(out / batch.PARQUET).shape[0] == 6
    assert pd.read_csv(out / batch.CSV).set_index("study").status.to_dict() == rows.status.to_dict()
    hashes = [r["input_hash"] for r in history.list_records(db)]
    assert sorted(hashes) == sorted(done.input_hash)
    journal = [json.loads(line) for line in (out / batch.JOURNAL).read_text().splitlines()]
    assert len(journal) == len(first) + 6 - s2["skipped"]     # one line per finished study

    # a third run finds everything done (the error row is retried and fails again)
    again = batch.run(cohort, out=out, model=bundle, history=db, scheduler=cluster, **FAST)
    s3 = again.attrs["summary"]
    assert (s3["skipped"], s3["errors"], s3["analysed"]) == (5, 1, 0)


# --------------------------------------------------------------------------- external scheduler
@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """`dask scheduler` and one `dask worker` process on loopback ports, torn down after."""
    dask = shutil.which("dask") or str(Path(sys.executable).with_name("dask"))
    if not Path(dask).exists():
        pytest.skip("the `dask` command is not installed (pip install 'dicompipe[batch]')")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), DICOMPIPE_THREADS="1")
    logs = tmp_path_factory.mktemp("dask")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(logs / "scheduler.log", "w"))]
    try:
        procs.append(subprocess.Popen([dask, "worker", addr, "--nworkers", "1", "--nthreads", "1",
                                       "--no-dashboard", "--local-directory", str(logs)],
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(logs / "worker.log", "w")))
        from distributed import Client
        deadline = time.monotonic() + 60
        with Client(addr, timeout="30s") as c:
            while not c.scheduler_info()["workers"]:
                if time.monotonic() > deadline:
                    pytest.fail("the dask worker did not join: " + (logs / "worker.log").read_text())
                time.sleep(0.2)
        yield addr
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_external_scheduler(tmp_path, cohort, bundle, scheduler):
    studies = [cohort / "case-3", {"path": cohort / "case-4", "study": "four"}]
    df = batch.run(studies, out=tmp_path / "out", model=bundle, history=False,
                   scheduler=scheduler, **FAST)
    assert df.attrs["summary"]["workers"] == 1
    assert list(df.status) == ["done", "done"] and set(df.study) == {"case-3", "four"}
    assert df.warm.tolist().count(False) <= 1                 # one worker: one cold case
    again = batch.run(studies, out=tmp_path / "out", model=bundle, history=False,
                      scheduler=scheduler, **FAST)
    assert again.attrs["summary"]["skipped"] == 2


@pytest.mark.slow
def test_cli_batch_refuses_untrained_bundle_per_study(tmp_path, cohort, bundle, scheduler, capsys):
    m = tmp_path / "m.csv"
    m.write_text(f"path,study\n{cohort / 'case-1'},one\n{cohort / 'broken'},bad\n")
    rc = main(["batch", str(m), "--out", str(tmp_path / "out"), "--organ", "lung",
               "--model", str(bundle), "--scheduler", scheduler, "--backend", "torch",
               "--no-history", "--quiet", "--format", "json"])
    cap = capsys.readouterr()
    assert rc == 1 and "2 studies: 0 analysed" in cap.out and "2 failed" in cap.out
    rows = pd.read_csv(tmp_path / "out" / batch.CSV).set_index("study")
    assert "untrained" in rows.loc["one", "error"] and rows.loc["bad", "status"] == "error"
    assert "Traceback" not in cap.err
