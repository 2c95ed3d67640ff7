"""What the out-of-distribution check costs relative to ``model.predict`` (issue 13 target:
<= 2 % of predict time).

For a synthetic chest study, each repeat runs ``model.predict`` on every model slice (the
bundle's torch backend, layer4 kept) and then ``model.ood.check`` on the features it
returned (global average pool + the Mahalanobis/PPCA score + the volume rule), interleaved
so background load hits both alike. The OOD model is fitted on random pooled features with
the bundle's class count and ``--components`` components (cost does not depend on values).

Run: ``python -m benchmarks.ood [--slices 32] [--repeats 3] [--out benchmarks/results/ood.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.cam import get_bundle, synthetic_volume
from dicompipe import model as model_stage
from dicompipe import preprocess
from dicompipe.model.ood import check, fit_ood


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--components", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="synthetic slice matrix (pixels)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    bundle, weights = get_bundle(Path(tempfile.mkdtemp(prefix="ood-bench-")))
    batch = preprocess.prepare(synthetic_volume(args.slices, size=args.size), bundle.spec,
                               organ="lung", select_slices=False)
    rng = np.random.default_rng(0)
    k = len(bundle.labels)
    ood = fit_ood(np.abs(rng.normal(1, 0.3, (400, 2048))), rng.integers(0, k, 400),
                  n_components=args.components)
    model_stage.predict(bundle, batch, backend="torch", device="cpu",
                        batch_size=args.batch_size)                      # warm-up
    t_pred, t_ood, c_pred, c_ood = [], [], [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        preds = model_stage.predict(bundle, batch, backend="torch", device="cpu",
                                    batch_size=args.batch_size)
        t1, c1 = time.perf_counter(), time.process_time()
        c = check(ood, preds.features)
        t2, c2 = time.perf_counter(), time.process_time()
        t_pred.append(t1 - t0)
        t_ood.append(t2 - t1)
        c_pred.append(c1 - c0)
        c_ood.append(c2 - c1)
    ratio = [o / p for o, p in zip(t_ood, t_pred)]
    cpu_ratio = [o / p for o, p in zip(c_ood, c_pred)]
    res = {
        "what": "model.ood.check (pool + score + volume rule) vs model.predict, same features",
        "slices": int(len(batch.tensors)), "input": f"{bundle.spec.size} px",
        "features": list(preds.features.shape), "n_components": ood.n_components,
        "weights": weights, "repeats": args.repeats,
        "predict_s": {"median": float(np.median(t_pred)), "min": min(t_pred), "max": max(t_pred)},
        "ood_s": {"median": float(np.median(t_ood)), "min": min(t_ood), "max": max(t_ood)},
        "ood_over_predict": {"median": float(np.median(ratio)), "min": min(ratio),
                             "max": max(ratio)},
        "cpu_s": {"predict_median": float(np.median(c_pred)), "ood_median": float(np.median(c_ood))},
        "ood_over_predict_cpu": {"median": float(np.median(cpu_ratio)), "min": min(cpu_ratio),
                                 "max": max(cpu_ratio)},
        "note": "wall ratios are unreliable on a busy CPU; process CPU time (all threads) is "
                "less affected by other jobs",
        "target": 0.02, "scores_checked": len(c.scores),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor(),
                    "load_avg": list(os.getloadavg())},
    }
    print(f"predict {res['predict_s']['median']:.3f} s, OOD check {1000 * res['ood_s']['median']:.2f} ms "
          f"for {res['slices']} slices: {100 * res['ood_over_predict']['median']:.2f} % of predict "
          f"(range {100 * min(ratio):.2f}-{100 * max(ratio):.2f} %, target <= 2 %); CPU time "
          f"{100 * res['ood_over_predict_cpu']['median']:.2f} % "
          f"(range {100 * min(cpu_ratio):.2f}-{100 * max(cpu_ratio):.2f} %)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
