"""Does overlapping slice rendering with inference (a bounded queue) pay on this CPU?

Same slices, same backend, two schedules, interleaved:

- ``sequential``: render every slice (``preprocess.render.render``: window, pad, resize,
  normalise — what ``prepare`` step 4 does), then run the model batch by batch;
- ``overlapped``: a producer thread renders batch i+1 into a ``queue.Queue(maxsize=2)``
  while the model runs batch i (ONNX Runtime and torch's resize release the GIL).

With every core already busy in the model, overlap can only fill the model's idle gaps,
so the gain is bounded by the render share of the work. Run:
``python -m benchmarks.overlap [--slices 96] [--backend onnx]``.
"""
from __future__ import annotations

import argparse
import queue
import threading

import numpy as np

from benchmarks.common import interleaved, table


def slices(n: int, size: int = 512) -> np.ndarray:
    from benchmarks.e2e import chest
    return chest((n, size, size))


def sequential(run, hu, spec, bs):
    from dicompipe.preprocess.render import render
    x = np.stack([render(s, spec) for s in hu])
    return [run(x[i:i + bs]) for i in range(0, len(x), bs)]


def overlapped(run, hu, spec, bs, depth: int = 2):
    """Producer thread renders batches into a bounded queue; the caller's thread infers."""
    from dicompipe.preprocess.render import render
    q: queue.Queue = queue.Queue(maxsize=depth)
    err: list[BaseException] = []

    def produce():
        try:
            for i in range(0, len(hu), bs):
                q.put(np.stack([render(s, spec) for s in hu[i:i + bs]]))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            err.append(e)
        finally:
            q.put(None)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    out = []
    while (x := q.get()) is not None:
        out.append(run(x))
    t.join()
    if err:
        raise err[0]
    return out


def measure(bundle, n: int = 96, bs: int = 32, backend: str = "onnx", repeats: int = 3,
            size: int = 512) -> dict:
    from dicompipe.model.backends import get_backend
    from dicompipe.preprocess.render import render

    run = get_backend(bundle, backend, "cpu")
    spec = bundle.spec
    hu = slices(n, size)
    x = np.stack([render(s, spec) for s in hu[:bs]])
    fns = {
        "render only": lambda: [render(s, spec) for s in hu],
        "model only": lambda: [run(x) for _ in range(0, n, bs)],
        "sequential": lambda: sequential(run, hu, spec, bs),
        "overlapped": lambda: overlapped(run, hu, spec, bs),
    }
    t = interleaved(fns, repeats=repeats, warmup=1)
    seq, ovl = t["sequential"].median, t["overlapped"].median
    return {"slices": n, "batch": bs, "backend": getattr(run, "name", backend),
            "timings": {k: v.to_dict() for k, v in t.items()},
            "overlap_speedup": round(seq / ovl, 3),
            "render_share": round(t["render only"].median / seq, 3)}


def overlap_table(res: dict) -> str:
    t = res["timings"]
    rows = [[k, f"{v['median_s']:.2f} s [{v['min_s']:.2f}-{v['max_s']:.2f}]",
             f"{res['slices'] / v['median_s']:.1f} slices/s"] for k, v in t.items()]
    return table(rows, [f"render+model, {res['slices']} slices ({res['backend']})",
                        "wall median [range]", "throughput"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from benchmarks.inference import bench_bundle
    res = measure(bench_bundle(), a.slices, a.batch_size, a.backend, a.repeats)
    print(overlap_table(res))
    print(f"overlap speedup {res['overlap_speedup']}x; render is {100 * res['render_share']:.0f}% "
          "of the sequential time")
    return res


if __name__ == "__main__":
    main()
