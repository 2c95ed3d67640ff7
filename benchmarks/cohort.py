"""A cohort through ``dicompipe batch`` against a loop of ``dicompipe analyze`` processes.

- ``make_cohort(root, n, slices)`` writes ``n`` synthetic 512x512 chest studies (the
  :mod:`benchmarks.e2e` phantom, one uncompressed int16 DICOM file per slice) that differ by
  a per-study HU offset, so their content hashes differ and the batch analyses every one;
- ``batch`` runs ``dicompipe.batch.run`` on a fresh LocalCluster of ``workers`` processes
  (the real built-in lung bundle, ``--format json,txt``) into an empty output folder:
  wall time (cluster start included, and without it), the per-study columns of the table
  (hash, analyse, report, task), the first (cold) case of each worker, peak RSS per worker;
- ``cli-loop`` runs ``dicompipe analyze STUDY --organ lung --format json,txt`` once per
  study (a fresh process each: imports, bundle load, compiled-model cache read every time).

The load average is sampled every 5 s during each contender (the machine may be shared).

Run: ``python -m benchmarks.cohort [--n 50] [--slices 60] [--workers 1,2] [--cli-n 10]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, WORK, machine, write_json
from benchmarks.e2e import SPACING, chest


def make_cohort(root: Path, n: int, slices: int = 60, size: int = 512) -> list[Path]:
    """``n`` study folders under ``root`` (written once; a ``.complete`` marker per study)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from synth import write_ct_series

    shape = (slices, size, size)
    base = None
    out = []
    for i in range(n):
        folder = root / f"study-{i:03d}"
        out.append(folder)
        if (folder / ".complete").is_file():
            continue
        if base is None:
            base = chest(shape)
        shutil.rmtree(folder, ignore_errors=True)
        write_ct_series(folder / "series", shape=shape, spacing=SPACING,
                        origin=(-size * SPACING[0] / 2, -size * SPACING[1] / 2, -300.0),
                        hu=base + np.float32(i % 7), description="Synthetic chest CT (cohort)",
                        body_part="CHEST", names="dcm")
        (folder / ".complete").write_text("ok\n")
    return out


class LoadSampler:
    """The 1-minute load average every ``every`` seconds while running."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2)}


def run_batch(root: Path, workers: int, fmt: str) -> dict:
    """One batch over every study under ``root`` on a new LocalCluster of ``workers``."""
    from dicompipe import batch

    out = Path(tempfile.mkdtemp(prefix=f"cohort-batch{workers}-", dir=WORK))
    t0 = time.perf_counter()
    with LoadSampler() as load:
        df = batch.run(root, out=out / "out", organ="lung", formats=fmt,
                       history=out / "history.sqlite", workers=workers, progress=False,
                       dashboard=False)
    wall = time.perf_counter() - t0
    s = df.attrs["summary"]
    done = df[df.status == "done"]
    cold = done[~done.warm.astype(bool)]
    warm = done[done.warm.astype(bool)]
    n = len(done)
    res = {
        "workers": workers, "studies": n, "errors": int((df.status == "error").sum()),
        "wall_s": round(wall, 1), "wall_without_cluster_start_s": s["wall_s"],
        "studies_per_hour": round(3600 * n / s["wall_s"], 1),
        "warm_case_s": _stats(warm.t_task), "cold_case_s": _stats(cold.t_task),
        "analyse_s": _stats(warm.t_analyze), "report_s": _stats(warm.t_report),
        "hash_s": _stats(done.t_hash),
        # worker-seconds per study the batch spent beyond the warm task itself
        "overhead_per_study_s": round(s["wall_s"] * workers / n - float(warm.t_task.mean()), 2),
        "peak_rss_mb_per_worker": {w: float(g.peak_rss_mb.max()) for w, g in done.groupby("worker")},
        "load_average": load.summary(),
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_cli_loop(studies: list[Path], fmt: str) -> dict:
    """``dicompipe analyze`` once per study, one process each."""
    out = Path(tempfile.mkdtemp(prefix="cohort-cli-", dir=WORK))
    times = []
    with LoadSampler() as load:
        for s in studies:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dicompipe.cli", "analyze", str(s), "--organ",
                            "lung", "--format", fmt, "--out", str(out / "runs"), "--history",
                            str(out / "history.sqlite"), "--quiet"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
    shutil.rmtree(out, ignore_errors=True)
    return {"studies": len(studies), "wall_s": round(sum(times), 1), "per_study_s": _stats(times),
            "studies_per_hour": round(3600 * len(times) / sum(times), 1),
            "load_average": load.summary()}


def _stats(values) -> dict:
    v = np.asarray(list(values), float)
    if not len(v):
        return {}
    return {"median": round(float(np.median(v)), 2), "mean": round(float(v.mean()), 2),
            "min": round(float(v.min()), 2), "max": round(float(v.max()), 2), "n": int(len(v))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="studies in the cohort")
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--workers", default="1,2", help="worker counts to run, comma list")
    ap.add_argument("--cli-n", type=int, default=10, help="studies for the CLI loop (0: none)")
    ap.add_argument("--format", default="json,txt")
    ap.add_argument("--out", type=Path, default=RESULTS / "cohort.json")
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    root = WORK / f"cohort-{args.n}x{args.slices}"
    t = time.perf_counter()
    studies = make_cohort(root, args.n, args.slices)
    print(f"cohort: {len(studies)} studies under {root} ({time.perf_counter() - t:.0f} s)", flush=True)
    res: dict = {"machine": machine(), "cohort": {"studies": args.n, "slices": args.slices,
                                                  "matrix": "512x512", "format": args.format,
                                                  "organ": "lung (built-in bundle)"}}
    for w in [int(x) for x in args.workers.split(",") if x]:
        res[f"batch-{w}"] = run_batch(root, w, args.format)
        print(f"batch-{w}: {res[f'batch-{w}']}", flush=True)
    if args.cli_n:
        res["cli-loop"] = run_cli_loop(studies[: args.cli_n], args.format)
        res["cli-loop"]["extrapolated_wall_s"] = round(
            res["cli-loop"]["per_study_s"]["mean"] * args.n, 1)
        print(f"cli-loop: {res['cli-loop']}", flush=True)
    write_json(res, args.out)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
