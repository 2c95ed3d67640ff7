"""Benchmark ``dicompipe.analyze`` on a synthetic 512x512x300, 1 mm chest-like DICOM series.

Reports the time of every stage, the model stage's slices/s (torch backend, channels_last,
batched, BN folded) and, measured in the same run on the same CPU, a plain torch forward of
the same ResNet50 (NCHW, batch 16, inference_mode) — the ratio between the two is what this
code controls; absolute numbers depend on what else the CPU is doing (say, a training run).

Weights are seeded random (a fixture bundle, ``trained: false``): speed does not depend on them.

Usage::

    python benchmarks/analyze.py                       # 300 slices of 512x512, 1 mm
    python benchmarks/analyze.py --slices 60 --json out.json --slab-mm 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))          # synth.py, tiny_bundle.py


def interleaved_rates(bundle, x, rounds: int = 3) -> tuple[float, float]:
    """Median slices/s of (dicompipe torch backend, plain torch forward) on the same batch,
    measured alternately so that both see the same background CPU load.

    Plain = the bundle's network as built, NCHW, BN not folded, ``torch.inference_mode``."""
    import statistics

    import torch

    from dicompipe.model.backends import TorchBackend
    run = TorchBackend(bundle, "cpu")
    net = bundle.network()
    xt = torch.from_numpy(x)
    ours, plain = [], []
    with torch.inference_mode():
        run(x), net(xt)                                   # warm-up
        for _ in range(rounds):
            t = time.perf_counter()
            run(x)
            ours.append(len(x) / (time.perf_counter() - t))
            t = time.perf_counter()
            net(xt)
            plain.append(len(x) / (time.perf_counter() - t))
    return statistics.median(ours), statistics.median(plain)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spacing", type=float, default=0.7, help="in-plane mm of the series")
    ap.add_argument("--slab-mm", type=float, default=5.0, help="bundle slab thickness (mm)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-cam", action="store_true")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    import torch
    from synth import write_ct_series
    from tiny_bundle import chest_phantom, make_bundle

    import dicompipe
    from dicompipe.model import load_bundle
    from dicompipe.types import PreprocessSpec

    tmp = Path(tempfile.mkdtemp(prefix="dicompipe-bench-"))
    t = time.perf_counter()
    n, s = args.slices, args.size
    write_ct_series(tmp / "ct", shape=(n, s, s), spacing=(args.spacing, args.spacing, 1.0),
                    origin=(-s * args.spacing / 2, -s * args.spacing / 2, -n / 2.0),
                    hu=chest_phantom((n, s, s), lung_z=(0.15, 0.85)), body_part="CHEST",
                    description="synthetic chest 1 mm")
    spec = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)],
                          slab_mm=args.slab_mm)
    bundle_path = make_bundle(tmp / "bundle", organ="lung", spec=spec)
    setup_s = time.perf_counter() - t

    a = dicompipe.analyze(tmp / "ct", organ="auto", model=bundle_path, backend=args.backend,
                          device="cpu", batch_size=args.batch_size, cam=not args.no_cam,
                          allow_untrained=True)
    info = a.predictions.model_info
    total = sum(a.timings.values())
    # the same network, plain torch, same process, alternating: the CPU-load reference
    old = torch.get_num_threads()
    torch.set_num_threads(info["threads"])
    x = a.batch.tensors[:args.batch_size]
    ours, plain = interleaved_rates(load_bundle(bundle_path, allow_untrained=True), x)
    torch.set_num_threads(old)
    result = {
        "series": {"shape_zyx": [n, s, s], "spacing_mm": [args.spacing, args.spacing, 1.0]},
        "spec": {"slab_mm": spec.slab_mm, "size": spec.size},
        "model_slices": len(a.batch.slices), "analysed_slices": len(a.batch.included),
        "timings_s": a.timings, "total_s": round(total, 2),
        "model": {"backend": info["backend"], "threads": info["threads"],
                  "batch_size": info["batch_size"], "setup_s": info["setup_s"],
                  "inference_s": info["inference_s"], "slices_per_s": info["slices_per_s"],
                  "interleaved_backend_slices_per_s": round(ours, 2),
                  "interleaved_plain_torch_slices_per_s": round(plain, 2),
                  "ratio_vs_plain": round(ours / plain, 2)},
        "load_average": list(os.getloadavg()), "cpus": len(os.sched_getaffinity(0)),
        "setup_s (writing the series, not timed)": round(setup_s, 1),
        "verdict": a.verdict.label + " (fixture weights: meaningless)",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
