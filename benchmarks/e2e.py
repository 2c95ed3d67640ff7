"""Series loading vs SimpleITK, and end-to-end ``analyze`` on a synthetic CT study.

- ``study(shape)`` writes (once, cached under benchmarks/_work) a synthetic chest CT as a
  DICOM series, one uncompressed int16 file per slice, 0.7 x 0.7 mm pixels, 1 mm slices.
- ``load_vs_sitk`` times ``io.discover + io.select + io.load`` against SimpleITK's
  ``ImageSeriesReader`` (GDCM file ordering + read) on that folder, interleaved.
- ``analyze_runs`` runs ``dicompipe.analyze`` in a fresh subprocess per repeat, so each
  run's peak RSS is its own, and collects the per-stage wall times analyze reports.

Run alone: ``python -m benchmarks.e2e [--tiny] [--backend onnx]``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, WORK, Timing, interleaved, table
from benchmarks.load import reset_peak, rss_mb

SPACING = (0.7, 0.7, 1.0)


def chest(shape) -> np.ndarray:
    """A chest-like HU volume (z, y, x): body ellipse, two lungs, a nodule; int16-safe."""
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    yy, xx = yy / ny - 0.5, xx / nx - 0.5
    body = (yy / 0.38) ** 2 + (xx / 0.46) ** 2 <= 1
    lungs = (((yy + 0.02) / 0.27) ** 2 + ((np.abs(xx) - 0.2) / 0.15) ** 2) <= 1
    sl = np.where(lungs, -850.0, np.where(body, 40.0, -1000.0)).astype(np.float32)
    rng = np.random.default_rng(0)
    arr = np.empty(shape, np.float32)
    for z in range(nz):
        arr[z] = sl + rng.normal(0, 15, sl.shape).astype(np.float32)
        r = 0.03 * max(0.0, 1 - ((z - nz / 2) / (0.1 * nz + 1)) ** 2) ** 0.5
        if r > 0:
            arr[z][((yy / r) ** 2 + ((xx - 0.2) / r) ** 2) <= 1] = 30.0
    return arr


def study(shape=(300, 512, 512)) -> Path:
    """Folder of a synthetic DICOM series with ``shape`` (z, y, x), written once."""
    folder = WORK / f"study-{shape[2]}x{shape[1]}x{shape[0]}"
    done = folder / ".complete"
    if done.is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    from synth import write_ct_series  # tests/synth.py: the project's synthetic DICOM writer

    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    write_ct_series(folder / "series", shape=shape, spacing=SPACING,
                    origin=(-shape[2] * SPACING[0] / 2, -shape[1] * SPACING[1] / 2, -300.0),
                    hu=chest(shape), description="Synthetic chest CT (benchmark)",
                    body_part="CHEST", names="dcm")
    done.write_text("ok\n")
    return folder


def load_vs_sitk(folder: Path, repeats: int = 3) -> dict:
    """dicompipe io (discover+select+load) vs SimpleITK ImageSeriesReader, interleaved."""
    import SimpleITK as sitk

    from dicompipe import io

    def ours():
        return io.load(io.select(io.discover(folder)))

    def reference():
        r = sitk.ImageSeriesReader()
        d = str(folder / "series")
        r.SetFileNames(r.GetGDCMSeriesFileNames(d))
        return r.Execute()

    a, b = ours(), reference()           # also checks both read the same voxels
    same = a.shape == sitk.GetArrayViewFromImage(b).shape and bool(
        np.allclose(a.array, sitk.GetArrayViewFromImage(b), atol=0.5))
    t = interleaved({"dicompipe": ours, "sitk": reference}, repeats=repeats, warmup=0)
    return {"study": f"{a.shape[2]}x{a.shape[1]}x{a.shape[0]}", "files": a.shape[0],
            "dicompipe": t["dicompipe"].to_dict(), "sitk": t["sitk"].to_dict(),
            "ratio_dicompipe_over_sitk": round(t["dicompipe"].median / t["sitk"].median, 3),
            "same_voxels": same}


def load_fresh_processes(shape=(300, 512, 512), repeats: int = 3, warm: bool = True) -> dict:
    """The io stage's own benchmark (benchmarks/load.py): every load in a fresh process
    (own peak RSS), files shuffled without extensions; dicompipe vs SimpleITK on the
    pre-sorted file list ("sitk") and with GDCM's discovery + sort ("sitk+gdcm-sort").
    Here: median and range of ``repeats`` interleaved runs after one warm-up each."""
    from benchmarks import load as L

    folder = WORK / f"load-{shape[2]}x{shape[1]}x{shape[0]}" / "series"
    if not (folder.is_dir() and (folder.parent / "series.order.json").is_file()):
        folder.parent.mkdir(parents=True, exist_ok=True)
        L.make_series(folder, shape=shape)
    kinds = ["dicompipe", "sitk", "sitk+gdcm-sort"]
    for k in kinds if warm else ():
        L.run(k, folder)
    runs = {k: [] for k in kinds}
    for _ in range(repeats):
        for k in kinds:
            runs[k].append(L.run(k, folder))
    out = {"study": f"{shape[2]}x{shape[1]}x{shape[0]}", "files": shape[0],
           "method": "benchmarks/load.py: fresh process per load, shuffled files"}
    for k, rs in runs.items():
        out[k] = {**Timing([r["seconds"] for r in rs]).to_dict(),
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
    out["ratio_dicompipe_over_sitk"] = round(out["dicompipe"]["median_s"] / out["sitk"]["median_s"], 3)
    return out


def load_table(res: dict) -> str:
    rows = [[k, f"{res[k]['median_s']:.2f} s [{res[k]['min_s']:.2f}-{res[k]['max_s']:.2f}]",
             f"{res[k]['median_s'] / res['sitk']['median_s']:.2f}x"]
            for k in ("dicompipe", "sitk", "sitk+gdcm-sort") if k in res]
    return table(rows, [f"load {res['study']} ({res['files']} files)", "time median [range]",
                        "vs SimpleITK"])


# --------------------------------------------------------------------------- analyze
def _child(args) -> None:
    """Subprocess body: one analyze run, JSON on stdout (timings, peak RSS)."""
    t = time.perf_counter()
    import dicompipe
    from dicompipe import explain, model, preprocess  # noqa: F401  (analyze imports them)
    imports = time.perf_counter() - t

    # peak RSS per stage: the progress callback marks stage changes; the kernel's high-water
    # mark (VmHWM) is read and reset there (/proc/self/clear_refs), so each stage gets its own
    stage_peaks: dict[str, float] = {}
    current = ["start"]

    def progress(stage, fraction, message):
        if stage != current[0]:
            stage_peaks[current[0]] = max(stage_peaks.get(current[0], 0.0), rss_mb())
            reset_peak()
            current[0] = stage

    t = time.perf_counter()
    a = dicompipe.analyze(args.run, organ="lung", model=args.bundle, backend=args.backend[-1],
                          device="cpu", batch_size=args.batch_size, cam=True,
                          allow_untrained=True, progress=progress)
    total = time.perf_counter() - t
    stage_peaks[current[0]] = max(stage_peaks.get(current[0], 0.0), rss_mb())
    print(json.dumps({"total_s": round(total, 3), "imports_s": round(imports, 3),
                      "stages_s": a.timings,
                      # VmHWM, not getrusage: ru_maxrss of a forked child starts at the
                      # parent's RSS (the suite's, several GB), so it overstates this run
                      "peak_rss_mb": round(max(stage_peaks.values()), 1),
                      "stage_peak_rss_mb": {k: round(v, 1) for k, v in stage_peaks.items()},
                      "slices": len(a.batch.included), "grid_slices": len(a.batch.slices),
                      "backend": a.predictions.model_info.get("backend"),
                      "slices_per_s": a.predictions.model_info.get("slices_per_s"),
                      "verdict": a.verdict.label}))


def analyze_runs(folder: Path, bundle_path: Path, backends=("onnx",), repeats: int = 3,
                 batch_size: int = 32, timeout: float = 900) -> dict:
    """Per backend: ``repeats`` fresh-process analyze runs (interleaved across backends)."""
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for _ in range(repeats):
        for b in backends:
            cmd = [sys.executable, "-m", "benchmarks.e2e", "--run", str(folder),
                   "--bundle", str(bundle_path), "--backend", b, "--batch-size", str(batch_size)]
            t = time.perf_counter()
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            wall = time.perf_counter() - t
            if p.returncode != 0:
                runs[b].append({"error": (p.stderr or p.stdout).strip().splitlines()[-1:]})
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["process_wall_s"] = round(wall, 3)      # + interpreter start and imports
            runs[b].append(r)
    out = {}
    for b, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[b] = {"error": rs[0]["error"] if rs else "no run"}
            continue
        stages = {k: Timing([r["stages_s"][k] for r in ok]).to_dict() for k in ok[0]["stages_s"]}
        out[b] = {"total": Timing([r["total_s"] for r in ok]).to_dict(),
                  "process_wall": Timing([r["process_wall_s"] for r in ok]).to_dict(),
                  "imports": Timing([r["imports_s"] for r in ok]).to_dict(),
                  "stages": stages,
                  "peak_rss_mb": {"median": float(np.median([r["peak_rss_mb"] for r in ok])),
                                  "max": max(r["peak_rss_mb"] for r in ok)},
                  "stage_peak_rss_mb": {k: max(r["stage_peak_rss_mb"].get(k, 0) for r in ok)
                                        for k in ok[0]["stage_peak_rss_mb"]},
                  "slices": ok[0]["slices"], "grid_slices": ok[0]["grid_slices"],
                  "model_slices_per_s": [r["slices_per_s"] for r in ok], "runs": rs}
    return out


def analyze_table(res: dict, study_name: str) -> str:
    rows = []
    for b, r in res.items():
        if "error" in r:
            rows.append([b, "error", str(r["error"])[:60], ""])
            continue
        for k, v in r["stages"].items():
            rows.append([b, k, f"{v['median_s']:.2f} s [{v['min_s']:.2f}-{v['max_s']:.2f}]", ""])
        t = r["total"]
        rows.append([b, "TOTAL analyze()", f"{t['median_s']:.2f} s [{t['min_s']:.2f}-{t['max_s']:.2f}]",
                     f"peak RSS {r['peak_rss_mb']['max']:.0f} MB, {r['slices']} model slices"])
    return table(rows, ["backend", f"analyze {study_name}: stage", "wall median [range]", ""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--backend", action="append")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--run", help=argparse.SUPPRESS)        # subprocess mode
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run:
        return _child(a)
    from benchmarks.inference import bench_bundle
    shape = (8, 64, 64) if a.tiny else (300, 512, 512)
    folder = study(shape)
    lr = load_vs_sitk(folder, repeats=1 if a.tiny else a.repeats)
    print(load_table(lr))
    b = bench_bundle()
    res = analyze_runs(folder, b.path, tuple(a.backend or ["onnx"]), 1 if a.tiny else a.repeats,
                       a.batch_size)
    print(analyze_table(res, f"{shape[2]}x{shape[1]}x{shape[0]}"))


if __name__ == "__main__":
    main()
