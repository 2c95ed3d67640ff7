"""dicompipe benchmark suite: ``python -m benchmarks [--tiny] [--only model,cam] [--out FILE]``.

Sections (each comparison measured in the same run, interleaved, median of repeats with
its min..max range):

1. load    series loading (io.discover+select+load) vs SimpleITK ImageSeriesReader;
2. model   slices/s per backend and batch size vs torch eager fp32 at batch 32, and as a
           fraction of the sgemm peak measured at the start of the run;
3. cam     forward alone vs forward + closed-form Grad-CAM vs the autograd Grad-CAM path;
4. e2e     ``dicompipe.analyze`` on a synthetic 512x512x300, 1 mm chest CT in fresh
           processes: wall time per stage, total, peak RSS (per stage too);
5. overlap rendering overlapped with inference through a bounded queue vs one after the other.

Writes ``benchmarks/results/<machine>.json`` (``--tiny``: benchmarks/_work/tiny.json) and
prints one table. ``--tiny`` runs every section on toy sizes in well under a minute (the smoke
test); its numbers mean nothing. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
import traceback

from benchmarks import common

SECTIONS = ("load", "model", "cam", "e2e", "overlap")


def _fmt_s(d: dict) -> str:
    return f"{d['median_s']:.3g} s [{d['min_s']:.3g}-{d['max_s']:.3g}]"


def summary_rows(res: dict) -> list[list[str]]:
    """One table for everything: section, what, median [range], comparison."""
    rows: list[list[str]] = []
    sg = res.get("sgemm")
    if sg:
        g = sg["gflops"]
        rows.append(["peak", f"sgemm fp32 {sg['n']}^3, {sg['threads']} thr",
                     f"{g['median']:.0f} GFLOP/s [{g['min']:.0f}-{g['max']:.0f}]", "reference"])
    ld = res.get("load")
    if ld and "error" not in ld:
        for k in ("dicompipe", "sitk", "sitk+gdcm-sort"):
            if k in ld:
                rss = f", peak RSS {ld[k]['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in ld[k] else ""
                rows.append(["1 load", f"{k} {ld['study']}", _fmt_s(ld[k]),
                             f"{ld[k]['median_s'] / ld['sitk']['median_s']:.2f}x sitk{rss}"])
    md = res.get("model")
    if md and "error" not in md:
        for r in md["rows"]:
            s = r["slices_per_s"]
            frac = f", {100 * r['fraction_of_sgemm']:.0f}% sgemm" if r.get("fraction_of_sgemm") else ""
            rows.append(["2 model", f"{r['backend']} b{r['batch']} @{md['size']}px",
                         f"{s['median']:.1f}/s [{s['min']:.1f}-{s['max']:.1f}]",
                         f"{r['ratio_vs_baseline']:.2f}x eager-b{md['baseline'].split()[-1]}{frac}"])
    cm = res.get("cam")
    if cm and "error" not in cm:
        t = cm["timings"]
        for k, v in t.items():
            rows.append(["3 cam", f"{k} ({cm['backend'] if k != 'autograd' else 'torch'}, "
                                  f"{cm['slices']} sl)", _fmt_s(v),
                         f"{v['median_s'] / t['forward']['median_s']:.2f}x forward"])
    e2e = res.get("e2e")
    if e2e and "error" not in e2e:
        for b, r in e2e["analyze"].items():
            if "error" in r:
                rows.append(["4 e2e", b, "error", str(r["error"])[:60]])
                continue
            peaks = r.get("stage_peak_rss_mb", {})
            for k, v in r["stages"].items():
                rows.append(["4 e2e", f"{b}: {k}", _fmt_s(v),
                             f"stage peak RSS {peaks[k]:.0f} MB" if k in peaks else ""])
            rows.append(["4 e2e", f"{b}: TOTAL analyze() ({r['slices']} sl)", _fmt_s(r["total"]),
                         f"peak RSS {r['peak_rss_mb']['max']:.0f} MB; imports "
                         f"{r['imports']['median_s']:.1f} s, process {r['process_wall']['median_s']:.1f} s"])
    ov = res.get("overlap")
    if ov and "error" not in ov:
        t = ov["timings"]
        for k, v in t.items():
            rows.append(["5 overlap", f"{k} ({ov['backend']}, {ov['slices']} sl)", _fmt_s(v),
                         f"{v['median_s'] / t['sequential']['median_s']:.2f}x sequential"])
    for name in SECTIONS:
        if isinstance(res.get(name), dict) and "error" in res[name]:
            rows.append([name, "ERROR", res[name]["error"][:70], ""])
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (smoke test), seconds")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections ({','.join(SECTIONS)})")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per figure")
    ap.add_argument("--e2e-repeats", type=int, default=3, help="analyze runs per backend")
    ap.add_argument("--e2e-backends", default="onnx,torch")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--size", type=int, default=224,
                    help="model input size for the model/cam sections (ResNet50 at 224 = 8.2 GFLOP)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<machine>.json)")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    tiny = a.tiny
    reps = 2 if tiny else a.repeats
    t_start = time.perf_counter()

    import torch
    res: dict = {"suite": "dicompipe benchmarks", "tiny": tiny,
                 "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": common.machine(), "argv": sys.argv[1:] if argv is None else argv}
    print(f"machine {res['machine']['id']}: {res['machine']['cpu']}, load average "
          f"{res['machine']['load_average']}", flush=True)
    try:
        torch.set_num_threads(res["machine"]["physical_cores"])
    except Exception:
        pass
    res["sgemm"] = common.sgemm_peak(n=1024 if tiny else 4096, repeats=reps)
    peak = res["sgemm"]["gflops"]["median"]

    def section(name, fn):
        if name not in only:
            return
        t = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            res[name] = fn()
        except Exception as e:  # one broken section must not lose the others
            res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(res[name]["traceback"], file=sys.stderr)
        print(f"[{name}] {time.perf_counter() - t:.0f} s", flush=True)

    from benchmarks import e2e, inference
    shape = (8, 64, 64) if tiny else (300, 512, 512)
    bundle = inference.bench_bundle()
    res["bundle"] = {"name": bundle.name, "sha256": bundle.sha256, "trained": bundle.trained,
                     "path": str(bundle.path)}

    def run_load():
        try:   # the io stage's benchmark (fresh process per load) when it is there
            return e2e.load_fresh_processes(shape, repeats=1 if tiny else 3, warm=not tiny)
        except ImportError:
            return e2e.load_vs_sitk(e2e.study(shape), repeats=1 if tiny else 3)
    section("load", run_load)
    section("model", lambda: inference.throughput(
        bundle, (2,) if tiny else tuple(int(b) for b in a.batch_sizes.split(",")),
        size=64 if tiny else a.size, repeats=reps, images_per_sample=2 if tiny else 32,
        which=("torch-eager", "torch", "onnx") if tiny else
        ("torch-eager", "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16",
         "openvino-int8"), sgemm_gflops=peak))
    section("cam", lambda: inference.cam_cost(bundle, n=2 if tiny else 32,
                                              size=64 if tiny else a.size, repeats=reps))

    def run_e2e():
        folder = e2e.study(shape)
        try:   # export once, untimed (it is cached per weights)
            from dicompipe.model.onnx_backend import export
            export(bundle)
        except ImportError:
            pass
        return {"study": f"{shape[2]}x{shape[1]}x{shape[0]}, {e2e.SPACING} mm (x, y, z)",
                "analyze": e2e.analyze_runs(folder, bundle.path,
                                            tuple(a.e2e_backends.split(",")) if not tiny else ("auto",),
                                            repeats=1 if tiny else a.e2e_repeats)}
    section("e2e", run_e2e)

    def run_overlap():
        from benchmarks import overlap
        return overlap.measure(bundle, n=4 if tiny else 96, bs=2 if tiny else 32,
                               backend="auto", repeats=1 if tiny else 3, size=64 if tiny else 512)
    section("overlap", run_overlap)

    res["machine"]["load_average_end"] = list(os.getloadavg())
    res["suite_seconds"] = round(time.perf_counter() - t_start, 1)
    out = a.out or (common.WORK / "tiny.json" if tiny
                    else common.RESULTS / f"{res['machine']['id']}.json")
    common.write_json(res, out)
    print()
    print(common.table(summary_rows(res), ["section", "what", "median [range]", "comparison"]))
    print(f"\n{res['machine']['id']} ({res['machine']['cpu']}, {res['machine']['physical_cores']} "
          f"cores, {' '.join(res['machine']['isa'])}); load average start "
          f"{res['machine']['load_average']}, end {res['machine']['load_average_end']}")
    print(f"wrote {out} in {res['suite_seconds']} s")
    return res


if __name__ == "__main__":
    main()
