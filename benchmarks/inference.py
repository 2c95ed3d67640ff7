"""Model throughput per backend and batch size, and the cost of Grad-CAM.

Backends measured in the same run, interleaved (see :mod:`benchmarks.common`):

- ``torch-eager``  the plain torch module, NCHW, ``inference_mode`` — the baseline;
- ``torch``        dicompipe's TorchBackend (what ``--backend torch`` runs: channels_last);
- ``onnx``         ONNX Runtime fp32 (``--backend onnx``/``auto`` on CPU);
- ``onnx-int8``    ONNX Runtime static int8 (QDQ). With the bundle's own calibration when it
                   ships one; otherwise quantized with ranges from synthetic slices, which
                   is fine for *speed* but says nothing about accuracy
                   (see ``benchmarks/int8_eval.py`` for that);
- ``openvino``, ``openvino-bf16``, ``openvino-int8``  the same ONNX files compiled by
                   OpenVINO (``pip install dicompipe[openvino]``): f32, bfloat16 (CPUs with
                   AMX/AVX512-BF16 only), and the int8 QDQ model above.

Run alone: ``python -m benchmarks.inference [--tiny]``.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.common import RESNET50_GFLOP_224, WORK, interleaved, table

BASELINE = "torch-eager"


def bench_bundle(tiny: bool = False, prefer_builtin: bool = True):
    """The bundle to benchmark: the built-in lung bundle when installed, else a scratch
    random-weight ResNet50 bundle under benchmarks/_work (speed does not depend on weights).

    The scratch bundle says ``trained: false``; the end-to-end run passes
    ``allow_untrained=True`` (timing only).
    """
    from dicompipe.model.bundle import available_bundles, load_bundle, save_bundle
    from dicompipe.model.network import resnet50
    from dicompipe.types import PreprocessSpec

    if prefer_builtin and "lung-resnet50" in available_bundles():
        try:
            return load_bundle("lung-resnet50")
        except Exception:  # untrained placeholder etc.: fall through to the scratch bundle
            pass
    path = WORK / "bundle-random-lung"
    if not (path / "configs" / "metadata.json").is_file():
        torch.manual_seed(0)
        spec = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)])
        save_bundle(path, resnet50(3).eval(), {
            "name": "benchmark-random-lung", "organ": "lung",
            "labels": ["normal", "benign", "malignant"], "positive_labels": ["malignant"],
            "preprocessing": spec, "trained": False,
            "intended_use": "BENCHMARK ONLY: seeded random weights, verdicts are meaningless.",
            "training": {"data": "none (random weights for timing)"}})
    return load_bundle(path, allow_untrained=True)


def synthetic_calibration(bundle, n: int = 16, size: int | None = None, seed: int = 0):
    """A CalibrationDataReader over synthetic chest-like rendered slices (speed runs only)."""
    from onnxruntime.quantization import CalibrationDataReader

    rng = np.random.default_rng(seed)
    spec = bundle.spec
    s = size or spec.size
    batches = [{"x": rng.normal(0, 1, (4, spec.channels, s, s)).astype(np.float32)}
               for _ in range(max(1, n // 4))]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    return Reader()


def int8_backend(bundle):
    """(backend, note): the bundle's validated int8, or a speed-only synthetic-calibration one."""
    from dicompipe.model import onnx_backend as ob

    if ob.calibration_path(bundle).is_file():
        return ob.OnnxBackend(bundle, precision="int8"), "bundle calibration"
    fp32 = ob.export(bundle)
    out = WORK / "int8-speed" / f"{bundle.sha256}.synthetic.int8.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        ob.quantize_static_file(fp32, out, synthetic_calibration(bundle))
    return (ob.OnnxBackend(bundle, precision="int8", path=out),
            "synthetic calibration: speed only, accuracy not validated")


def backends(bundle, which=("torch-eager", "torch", "onnx", "onnx-int8")) -> tuple[dict, dict]:
    """name -> callable(x) -> (logits, layer4), and name -> note."""
    from dicompipe.model.backends import TorchBackend
    from dicompipe.model.network import forward_with_features

    net = bundle.network()
    out, notes = {}, {}

    def eager(x):
        with torch.inference_mode():
            lg, a = forward_with_features(net, torch.from_numpy(x))
        return lg.numpy(), a.numpy()

    for name in which:
        try:
            if name == "torch-eager":
                out[name] = eager
                notes[name] = "torch eager fp32, NCHW (baseline)"
            elif name == "torch":
                out[name] = TorchBackend(bundle, "cpu")
                notes[name] = "dicompipe TorchBackend fp32, channels_last"
            elif name == "onnx":
                from dicompipe.model.onnx_backend import OnnxBackend
                out[name] = OnnxBackend(bundle, "cpu")
                notes[name] = f"ONNX Runtime fp32, {out[name].threads} threads"
            elif name == "onnx-int8":
                out[name], notes[name] = int8_backend(bundle)
            elif name.startswith("openvino"):
                from dicompipe.model import openvino_backend as vb
                precision = name.partition("-")[2] or "fp32"
                if precision == "bf16" and not vb.native_bf16():
                    notes[name] = "skipped: no native bfloat16 on this CPU"
                    continue
                path, note = None, ""
                if precision == "int8":                 # the same QDQ file as onnx-int8
                    onnx_int8, note = int8_backend(bundle)
                    path, note = onnx_int8.path, f" ({note})"
                out[name] = vb.OpenVinoBackend(bundle, "cpu", precision, path=path)
                notes[name] = f"OpenVINO {precision}, {out[name].threads} threads{note}"
        except ImportError as e:
            notes[name] = f"skipped: {e}"
    return out, notes


def throughput(bundle, batch_sizes=(1, 8, 32), size: int | None = None, repeats: int = 5,
               images_per_sample: int = 32, which=("torch-eager", "torch", "onnx", "onnx-int8"),
               sgemm_gflops: float | None = None) -> dict:
    """Slices/s per backend and batch size (median and range), ratio to torch-eager at the
    largest batch size, and fraction of the sgemm peak (fp32-equivalent FLOPs)."""
    spec = bundle.spec
    s = size or spec.size
    gflop = RESNET50_GFLOP_224 * (s / 224.0) ** 2
    threads = torch.get_num_threads()
    from dicompipe.util import physical_cores
    torch.set_num_threads(physical_cores())
    runs, notes = backends(bundle, which)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for bs in batch_sizes:
            x = rng.normal(0, 1, (bs, spec.channels, s, s)).astype(np.float32)
            calls = max(1, images_per_sample // bs)
            fns = {k: (lambda f=f, x=x, calls=calls: [f(x) for _ in range(calls)]) for k, f in runs.items()}
            for name, t in interleaved(fns, repeats=repeats, warmup=1).items():
                r = t.rate(bs * calls)
                rows.append({"backend": name, "batch": bs, "slices_per_s": r.to_dict(),
                             "timing": t.to_dict(), "images_per_sample": bs * calls})
    finally:
        torch.set_num_threads(threads)
    big = max(batch_sizes)
    base = next((r["slices_per_s"]["median"] for r in rows
                 if r["backend"] == BASELINE and r["batch"] == big), None)
    for r in rows:
        med = r["slices_per_s"]["median"]
        r["ratio_vs_baseline"] = round(med / base, 3) if base else None
        r["gflops"] = round(med * gflop, 1)
        r["fraction_of_sgemm"] = round(med * gflop / sgemm_gflops, 3) if sgemm_gflops else None
    return {"size": s, "gflop_per_slice": round(gflop, 3), "baseline": f"{BASELINE} batch {big}",
            "baseline_slices_per_s": base, "notes": notes, "rows": rows}


def throughput_table(res: dict) -> str:
    rows = [[r["backend"], r["batch"],
             f"{r['slices_per_s']['median']:.1f} [{r['slices_per_s']['min']:.1f}-{r['slices_per_s']['max']:.1f}]",
             f"{r['ratio_vs_baseline']:.2f}x" if r["ratio_vs_baseline"] else "-",
             f"{100 * r['fraction_of_sgemm']:.0f}%" if r.get("fraction_of_sgemm") else "-"]
            for r in res["rows"]]
    return table(rows, ["backend", "batch", "slices/s median [range]",
                        f"vs {res['baseline']}", "of sgemm peak"])


def cam_cost(bundle, n: int = 32, size: int | None = None, repeats: int = 5) -> dict:
    """Seconds for n slices: forward alone vs forward + closed-form Grad-CAM (all classes),
    on the fastest CPU backend, and the autograd Grad-CAM path (torch forward + backward
    per class, as pytorch-grad-cam does it)."""
    from dicompipe.explain import autograd_cam, class_maps
    from dicompipe.model.network import WithFeatures

    spec = bundle.spec
    s = size or spec.size
    x = np.random.default_rng(1).normal(0, 1, (n, spec.channels, s, s)).astype(np.float32)
    runs, notes = backends(bundle, ("onnx",))
    name = "onnx" if "onnx" in runs else "torch"
    if name == "torch":
        runs, notes = backends(bundle, ("torch",))
    run = runs[name]
    w = bundle.network().fc.weight.detach().float().numpy()
    model = WithFeatures(bundle.network())
    fns = {
        "forward": lambda: run(x),
        "forward+cam": lambda: class_maps(run(x)[1], w),
        "autograd": lambda: autograd_cam(model, x, batch_size=n),
    }
    t = interleaved(fns, repeats=repeats, warmup=1)
    fwd, cam, ag = (t[k].median for k in ("forward", "forward+cam", "autograd"))
    return {"backend": name, "slices": n, "size": s, "classes": len(bundle.labels),
            "timings": {k: v.to_dict() for k, v in t.items()},
            "cam_overhead": round(cam / fwd - 1, 4),
            "autograd_vs_closed_form": round(ag / cam, 2)}


def cam_table(res: dict) -> str:
    t = res["timings"]
    rows = [[k, f"{v['median_s'] * 1000:.0f} ms [{v['min_s'] * 1000:.0f}-{v['max_s'] * 1000:.0f}]",
             f"{v['median_s'] / t['forward']['median_s']:.2f}x"] for k, v in t.items()]
    return table(rows, [f"CAM, {res['slices']} slices ({res['backend']})", "time median [range]",
                        "vs forward"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    b = bench_bundle()
    res = throughput(b, (2,) if a.tiny else (1, 8, 32), size=64 if a.tiny else None,
                     repeats=2 if a.tiny else a.repeats, images_per_sample=2 if a.tiny else 32)
    print(throughput_table(res))
    print(json.dumps(res["notes"], indent=1))


if __name__ == "__main__":
    main()
