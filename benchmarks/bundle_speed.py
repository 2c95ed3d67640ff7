"""Lung bundles (or one bundle on two backends) on the same synthetic 60-slice 512x512
study, in process (one :class:`dicompipe.Analyzer` each, warm, no reports): the ``predict``
stage and the whole ``analyze`` call, median of the last ``--repeats`` runs (the first pays
the compile), the contenders interleaved.

Run: ``python -m benchmarks.bundle_speed OLD_BUNDLE NEW_BUNDLE --out FILE`` (e.g. the
previous bundle checked out of git against ``lung-resnet50``); ``BUNDLE@BACKEND`` picks the
backend, e.g. ``lung-resnet50 lung-resnet50@openvino-bf16``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> dict:
    import dicompipe
    from benchmarks.e2e import study as make_study
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="BUNDLE or BUNDLE@BACKEND (default backend auto)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    study = make_study((60, 512, 512))
    analyzers = {b: dicompipe.Analyzer(organ="lung", model=b.partition("@")[0], backend=b.partition("@")[2] or "auto")
                 for b in args.bundles}
    runs: dict = {b: [] for b in args.bundles}
    for _ in range(args.repeats + 1):
        for b, an in analyzers.items():
            t = time.perf_counter()
            a = an.analyze(str(study))
            runs[b].append({"wall_s": time.perf_counter() - t, "predict_s": a.timings["predict"],
                            "preprocess_s": a.timings["preprocess"]})
    out = {b: {k: statistics.median(r[k] for r in v[1:]) for k in ("wall_s", "predict_s", "preprocess_s")}
           | {"runs": v, "slices": 60} for b, v in runs.items()}
    print(json.dumps({b: {k: round(x, 2) for k, x in v.items() if k != "runs"} for b, v in out.items()}))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
