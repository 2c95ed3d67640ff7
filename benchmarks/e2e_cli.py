"""A study end to end as a user runs it: the whole ``dicompipe analyze`` process.

On the synthetic 512x512 chest studies of :mod:`benchmarks.e2e` (60 and 300 slices), each
run a fresh process, repeats interleaved across contenders, in one run:

- ``cli-warm``: ``dicompipe analyze STUDY --organ lung`` with the default formats (txt, png,
  json, nifti), the compiled-model cache already filled;
- ``cli-cold``: the same with an empty cache folder (the ONNX export and the OpenVINO
  compile are paid in the run: what the very first run on a machine costs);
- ``cli-int8``: ``cli-warm`` with ``--backend openvino-int8`` (the lung bundle's validated
  int8 calibration);
- ``cli-bf16``: ``cli-warm`` with ``--backend openvino-bf16`` (CPUs with native bf16 only:
  AMX or AVX512-BF16);
- ``naive``: :mod:`benchmarks.naive`, the straightforward pydicom + eager torch + autograd
  Grad-CAM script writing the same outputs;
- ``in-process``: one :class:`dicompipe.Analyzer` running the 60-slice study ``n`` times
  in one process (run_case, default formats): the 2nd..Nth case's wall time
  (``in-process-bf16`` / ``in-process-int8``, only when named in ``--only``: the same on
  OpenVINO bf16 / int8);
- ``cli-baseline`` (with ``--baseline-tree DIR``): the same ``analyze`` command run from
  another checkout of dicompipe (e.g. ``git worktree add --detach DIR v1.0``) with this
  environment's packages, warm: the before/after of a change, measured in one run.

Wall time and peak RSS (``ru_maxrss`` of the child; the runner imports nothing heavy, so
the fork does not inflate it) per run, medians with ranges, ratios to ``naive``.

Run: ``python -m benchmarks.e2e_cli [--slices 60,300] [--repeats 3] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, Timing, machine, table, write_json


def _run(cmd: list[str], env: dict | None = None, timeout: float = 1800, cwd: Path = ROOT) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS in MB."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        return {"error": (err or out).strip().splitlines()[-3:]}
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stdout": out.strip().splitlines()[-1:] if out else []}


def _cli(study: Path, out: Path, extra=()) -> list[str]:
    return [sys.executable, "-c", "import sys; from dicompipe.cli import main; sys.exit(main())",
            "analyze", str(study), "--organ", "lung", "--out", str(out), "--no-history",
            "--quiet", *extra]


def contenders(study: Path, work: Path, warm_cache: Path, baseline: Path | None = None) -> dict:
    """name -> () -> command result; each call uses a fresh output folder."""
    def env(cache, tree=None):
        e = {**os.environ, "DICOMPIPE_CACHE": str(cache)}
        if tree is not None:
            e["PYTHONPATH"] = str(tree)
        return e

    def fresh(name):
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))

    def cold():
        cache = fresh("cache")
        try:
            return _run(_cli(study, fresh("cold")), env(cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    return {
        "cli-warm": lambda: _run(_cli(study, fresh("warm")), env(warm_cache)),
        "cli-cold": cold,
        "cli-int8": lambda: _run(_cli(study, fresh("int8"), ("--backend", "openvino-int8")), env(warm_cache)),
        "cli-bf16": lambda: _run(_cli(study, fresh("bf16"), ("--backend", "openvino-bf16")), env(warm_cache)),
        "naive": lambda: _run([sys.executable, "-m", "benchmarks.naive", str(study),
                               str(fresh("naive"))]),
        **({"cli-baseline": lambda: _run(_cli(study, fresh("baseline")),
                                         # cwd there too: `python -c` puts the cwd first
                                         env(warm_cache, baseline), cwd=baseline)}
            if baseline else {}),
    }


def in_process(study: Path, out: Path, cache: Path, n: int = 4, backend: str = "auto") -> dict:
    """One Analyzer, ``n`` cases of ``study`` in one child process: wall time per case."""
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import dicompipe\n"
        "an = dicompipe.Analyzer(organ='lung', out=sys.argv[2], history=False, backend=sys.argv[4])\n"
        "times = []\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    t0 = time.perf_counter(); r = an.run_case(sys.argv[1]); assert r.ok, r.errors\n"
        "    times.append(round(time.perf_counter() - t0, 3))\n"
        "print(json.dumps(times))\n")
    r = _run([sys.executable, "-c", code, str(study), str(out), str(n), backend],
             {**os.environ, "DICOMPIPE_CACHE": str(cache)})
    if "error" in r:
        return r
    times = json.loads(r["stdout"][0])
    return {"case_s": times, "later_cases": Timing(times[1:]).to_dict(),
            "peak_rss_mb": r["peak_rss_mb"]}


def measure(slices=(60, 300), repeats: int = 3, which=None, n_in_process: int = 4,
            baseline: Path | None = None) -> dict:
    from benchmarks.e2e import study as make_study
    res: dict = {"machine": machine(), "repeats": repeats, "studies": {}}
    work = Path(tempfile.mkdtemp(prefix="dicompipe-e2e-cli-"))
    warm_cache = work / "cache"
    try:
        for n in slices:
            study = make_study((n, 512, 512))
            runs = contenders(study, work, warm_cache, baseline)
            names = [k for k in runs if which is None or k in which]
            for k in ("cli-warm", "cli-int8", "cli-bf16", "cli-baseline"):   # fill the caches, untimed
                if k in names or k == "cli-warm":
                    runs[k]()
            got: dict[str, list] = {k: [] for k in names}
            for _ in range(repeats):
                for k in names:
                    got[k].append(runs[k]())
                    print(f"  {n} slices {k}: {got[k][-1]}", flush=True)
            summary = {}
            for k, rs in got.items():
                ok = [r for r in rs if "error" not in r]
                summary[k] = ({"wall": Timing([r["wall_s"] for r in ok]).to_dict(),
                               "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "runs": rs}
                              if ok else {"error": rs[0]["error"]})
            base = summary.get("naive", {}).get("wall", {}).get("median_s")
            for v in summary.values():
                if base and "wall" in v:
                    v["ratio_to_naive"] = round(v["wall"]["median_s"] / base, 3)
            if n == min(slices) and (which is None or "in-process" in which):
                summary["in-process"] = in_process(study, work / "inproc", warm_cache, n_in_process)
            for precision in ("bf16", "int8"):
                if n == min(slices) and which is not None and f"in-process-{precision}" in which:
                    summary[f"in-process-{precision}"] = in_process(
                        study, work / f"inproc-{precision}", warm_cache, n_in_process, f"openvino-{precision}")
            res["studies"][f"{n}"] = summary
            for d in work.iterdir():                   # run folders are big; keep the cache
                if d != warm_cache:
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def report_table(res: dict) -> str:
    rows = []
    for n, summary in res["studies"].items():
        for k, v in summary.items():
            if "error" in v:
                rows.append([f"{n} slices", k, "error", str(v["error"])[:60]])
            elif k.startswith("in-process"):
                t = v["later_cases"]
                rows.append([f"{n} slices", f"{k}, 2nd..Nth case",
                             f"{t['median_s']:.2f} s [{t['min_s']:.2f}-{t['max_s']:.2f}]",
                             f"first case {v['case_s'][0]:.2f} s, peak RSS {v['peak_rss_mb']:.0f} MB"])
            else:
                t = v["wall"]
                rows.append([f"{n} slices", k, f"{t['median_s']:.2f} s [{t['min_s']:.2f}-{t['max_s']:.2f}]",
                             f"{v.get('ratio_to_naive', float('nan')):.2f}x naive, peak RSS "
                             f"{v['peak_rss_mb']:.0f} MB"])
    return table(rows, ["study", "contender", "wall median [range]", "comparison"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", default="60,300")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", help="comma list of contenders (cli-warm, cli-cold, cli-int8, cli-bf16, "
                                   "naive, in-process, in-process-bf16, in-process-int8, cli-baseline)")
    ap.add_argument("--baseline-tree", type=Path,
                    help="also time `analyze` from this checkout (e.g. the previous release)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/e2e_cli-<machine>.json)")
    a = ap.parse_args(argv)
    res = measure(tuple(int(s) for s in a.slices.split(",")), a.repeats,
                  a.only.split(",") if a.only else None, baseline=a.baseline_tree)
    res["baseline_tree"] = str(a.baseline_tree) if a.baseline_tree else None
    print(report_table(res))
    write_json(res, Path(a.out) if a.out else RESULTS / f"e2e_cli-{res['machine']['id']}.json")
    return res


if __name__ == "__main__":
    main()
