"""int8 or not: ONNX Runtime static quantization of a bundle, judged on its leak-free test split.

Steps (``python -m benchmarks.int8_eval [--bundle lung-resnet50] [--data ../shared/data/iq-othnccd]``):

1. Rebuild the bundle's leak-free split exactly as training/evaluation do
   (``dicompipe.train.train.load_data`` + ``make_split``, and the bundle's stored
   ``docs/split.json`` when present, as ``dicompipe evaluate`` does).
2. Calibrate: ``--calib`` (default 300) slices from the TRAIN part only, stratified by class,
   rendered with the bundle's preprocessing (the same ``to_input`` as training) — never test;
   ``--calib-extra SERIES...`` adds the rendered slices of DICOM series the bundle trained on.
3. Quantize the fp32 ONNX export: QDQ, per-channel int8 weights, uint8 activations, MinMax;
   the classifier (the Gemm after the last conv) stays float unless ``--quantize-classifier``.
4. Score fp32 ONNX, int8 ONNX and torch on the test part with the bundle's temperature:
   balanced accuracy, macro AUROC (with a paired bootstrap of the int8 - fp32 difference),
   predicted-class agreement (torch vs ONNX fp32 must be identical) and max |logit| error.
5. Gate: an int8 runtime passes if balanced accuracy drops <= 0.5 points AND macro AUROC
   drops <= 0.005 — ONNX Runtime and, when installed, OpenVINO, on the same QDQ file.
   OpenVINO fp32 and bf16 are scored against the same gate. Lung, when
   ``../shared/data/lung-pet-ct-dx-a0001`` is there (``--dicom-data``): the tumour-slice AUROC
   of P(malignant) on that CT must also stay within 0.01 of ONNX fp32 (``--no-dicom-gate``
   skips it; the 8-bit test alone let an int8 through that lost 0.06-0.12 there).
   When any int8 runtime passes,
   ``BUNDLE/models/int8_calibration.json`` ships (ranges + sha256 + the numbers + ``validated``:
   the int8 backends that passed); ``--backend onnx-int8`` / ``openvino-int8`` need it and
   refuse when not listed. None passes = that file is removed, the numbers still written.

Writes ``benchmarks/results/int8-<bundle>.json`` and prints a small table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, ROOT, table, write_json

MAX_BA_DROP = 0.005          # 0.5 points of balanced accuracy
MAX_AUROC_DROP = 0.005
MAX_DICOM_AUROC_DROP = 0.01  # tumour-slice AUROC on a0001 (11 of 51 slices): 0.01 ~ 5 of 440 pairs
DEFAULT_DATA = {"lung": ROOT.parent / "shared" / "data" / "iq-othnccd",
                "pancreas": ROOT.parent / "shared" / "data" / "pancreas-ct-kaggle"}


def balanced_accuracy(y, pred, k: int) -> float:
    rec = [np.mean(pred[y == c] == c) for c in range(k) if (y == c).any()]
    return float(np.mean(rec))


def split_for(bundle, data, workdir="training", log=print):
    """(items, y, images_u8, parts) of the bundle's leak-free split of ``data``."""
    from dicompipe.train.train import load_data, make_split

    md = bundle.metadata
    items, lab_names, images, _ = load_data(data, md["organ"], None, spec=bundle.spec,
                                            workdir=workdir, log=log)
    if list(lab_names) != list(bundle.labels):
        raise SystemExit(f"data labels {lab_names} != bundle labels {bundle.labels}")
    y = np.array([it.label for it in items])
    sp = (md.get("training") or {}).get("split") or {}
    parts, info = make_split(md["organ"], items, images, int(sp.get("seed", 0)),
                             tuple(sp.get("fractions", (0.65, 0.15, 0.20))))
    stored = Path(bundle.path) / "docs" / "split.json"
    if stored.exists():                     # the same rule as dicompipe evaluate
        st = json.loads(stored.read_text())["parts"]
        mine = {os.path.relpath(it.path, data): p for it, p in zip(items, parts)}
        if any(st.get(k, v) != v for k, v in mine.items()):
            log("split differs from the bundle's stored split: using the stored one")
            parts = [st.get(os.path.relpath(it.path, data)) for it in items]
    return items, y, images, parts, info


def inputs(images_u8, spec, idx, bs=32):
    """Model inputs for rows ``idx``, the training renderer (``data.to_input``), in batches."""
    import torch

    from dicompipe.train.data import to_input
    for a in range(0, len(idx), bs):
        u8 = torch.from_numpy(np.ascontiguousarray(images_u8[idx[a:a + bs]]))
        yield to_input(u8, spec, spec.size).contiguous().numpy()


def calibration_reader(images_u8, spec, idx, bs=16):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = inputs(images_u8, spec, idx, bs)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    return Reader()


def stratified(y, parts, part, n, seed=0):
    """Up to n indices of ``part``, proportional per class, spread evenly."""
    idx = np.nonzero(np.array([p == part for p in parts]))[0]
    if len(idx) <= n:
        return idx
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y[idx]):
        ic = idx[y[idx] == c]
        k = max(1, round(n * len(ic) / len(idx)))
        out.append(rng.choice(ic, min(k, len(ic)), replace=False))
    return np.sort(np.concatenate(out))


def paired_bootstrap(y, p_ref, p_new, k, n_boot=1000, seed=0):
    """95% intervals of (new - ref) for balanced accuracy and macro AUROC, same resamples."""
    from dicompipe.train.metrics import macro_auroc
    rng = np.random.default_rng(seed)
    d_ba, d_au = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < k:
            continue
        d_ba.append(balanced_accuracy(y[i], p_new[i].argmax(1), k)
                    - balanced_accuracy(y[i], p_ref[i].argmax(1), k))
        d_au.append(macro_auroc(y[i], p_new[i]) - macro_auroc(y[i], p_ref[i]))
    q = lambda v: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]  # noqa: E731
    return {"balanced_accuracy_diff_ci95": q(d_ba), "macro_auroc_diff_ci95": q(d_au), "n_boot": len(d_ba)}


def dicom_auroc(logits: np.ndarray, flag: np.ndarray, k: int) -> float:
    """Tumour-slice AUROC of the slice softmax's P(class k), as ``benchmarks.real_ct``."""
    from dicompipe.train.metrics import auroc
    from dicompipe.types import softmax
    return round(float(auroc(flag, softmax(logits, np.float64)[:, k])), 4)


def run(bundle, data, calib: int = 300, workdir="training", write=True, torch_check=True,
        calib_extra=(), quantize_classifier=False, dicom_data: Path | None = None, log=print) -> dict:
    import torch

    from dicompipe.model import onnx_backend as ob
    from dicompipe.train.metrics import macro_auroc
    from dicompipe.types import softmax
    from dicompipe.util import physical_cores

    t0 = time.perf_counter()
    items, y, images, parts, info = split_for(bundle, data, workdir, log)
    spec, k, T = bundle.spec, len(bundle.labels), bundle.temperature
    te = np.nonzero(np.array([p == "test" for p in parts]))[0]
    cal = stratified(y, parts, "train", calib)
    cal_images, cal_idx = images, cal
    if calib_extra:
        # DICOM renderings activate the network differently from 8-bit exports: ranges taken
        # from the exports alone clip them (lung rc.1: a0001 tumour-slice AUROC 0.80 -> 0.68)
        from dicompipe.train.run import dicom_normals
        extra = dicom_normals(calib_extra, bundle.organ, size=images.shape[-1])
        cal_images = np.concatenate([images[cal], extra])
        cal_idx = np.arange(len(cal_images))
    log(f"test {len(te)} slices, calibration {len(cal)} train slices + {len(cal_idx) - len(cal)} DICOM")

    fp32 = ob.OnnxBackend(bundle, "cpu", "fp32")
    with tempfile.TemporaryDirectory() as td:
        ranges = Path(td) / "ranges.json"
        q = Path(td) / "int8.onnx"
        t = time.perf_counter()
        float_nodes = [] if quantize_classifier else ob.classifier_nodes(fp32.path)
        ob.quantize_static_file(fp32.path, q, calibration_reader(cal_images, spec, cal_idx),
                                calibration_cache=ranges, float_nodes=float_nodes)
        t_quant = time.perf_counter() - t
        int8 = ob.OnnxBackend(bundle, "cpu", "int8", path=q)
        tensors = json.loads(ranges.read_text())

        def logits(run, x=None):
            batches = inputs(images, spec, te) if x is None else (x[a:a + 32] for a in range(0, len(x), 32))
            return np.concatenate([run(b)[0] for b in batches])
        torch.set_num_threads(physical_cores())
        t = time.perf_counter()
        lg32 = logits(fp32)
        t32 = time.perf_counter() - t
        t = time.perf_counter()
        lg8 = logits(int8)
        t8 = time.perf_counter() - t
        ov = openvino_backends(bundle, fp32.path, q, log)
        extra = {name: logits(be) for name, be in ov.items()}
        dicom = {}
        if dicom_data is not None and bundle.organ == "lung":
            from benchmarks.evidence_head import dicom_inputs
            mal = list(bundle.labels).index("malignant")
            for series, (x, flag) in dicom_inputs(bundle, dicom_data).items():
                dicom[series] = {"slices": int(len(flag)), "lesion_slices": int(flag.sum()),
                                 "tumour_slice_auroc": {name: dicom_auroc(logits(be, x), flag, mal) for name, be in
                                                        (("onnx-fp32", fp32), ("onnx-int8", int8), *ov.items())}}
    res = {"bundle": bundle.name, "version": bundle.version, "sha256": bundle.sha256,
           "data": str(data), "split": info, "test_slices": int(len(te)),
           "calibration": {"slices": int(len(cal)), "part": "train", "method": "MinMax",
                           "float_nodes": float_nodes,
                           "dicom_slices": int(len(cal_idx) - len(cal)),
                           "dicom_series": ["/".join(Path(x).parts[-2:]) for x in calib_extra],  # no local paths
                           "format": "QDQ, per-channel int8 weights, uint8 activations"},
           "temperature": T, "quantize_seconds": round(t_quant, 1),
           "test_inference_seconds": {"fp32": round(t32, 2), "int8": round(t8, 2)}}
    yt = y[te]
    out = {}
    for name, lg in (("onnx-fp32", lg32), ("onnx-int8", lg8), *extra.items()):
        p = softmax(lg / T, np.float64)
        out[name] = {"balanced_accuracy": round(balanced_accuracy(yt, p.argmax(1), k), 4),
                     "macro_auroc": round(macro_auroc(yt, p), 4)}
    if torch_check:
        from dicompipe.model.backends import TorchBackend
        tb = TorchBackend(bundle, "cpu")
        lgt = np.concatenate([tb(x)[0] for x in inputs(images, spec, te)])
        pt = softmax(lgt / T, np.float64)
        out["torch-fp32"] = {"balanced_accuracy": round(balanced_accuracy(yt, pt.argmax(1), k), 4),
                             "macro_auroc": round(macro_auroc(yt, pt), 4)}
        res["onnx_vs_torch"] = {"identical_predicted_classes": bool((lgt.argmax(1) == lg32.argmax(1)).all()),
                                "max_abs_logit_diff": float(np.abs(lgt - lg32).max())}
    res["metrics"] = out
    if dicom:
        res["dicom"] = dicom
    p32, p8 = softmax(lg32 / T, np.float64), softmax(lg8 / T, np.float64)
    d_ba = out["onnx-fp32"]["balanced_accuracy"] - out["onnx-int8"]["balanced_accuracy"]
    d_au = out["onnx-fp32"]["macro_auroc"] - out["onnx-int8"]["macro_auroc"]
    res["int8_vs_fp32"] = {
        "balanced_accuracy_drop": round(d_ba, 4), "macro_auroc_drop": round(d_au, 4),
        "predicted_class_agreement": round(float((lg32.argmax(1) == lg8.argmax(1)).mean()), 4),
        "max_abs_logit_diff": round(float(np.abs(lg32 - lg8).max()), 4),
        **paired_bootstrap(yt, p32, p8, k)}
    # every reduced-precision variant against ONNX fp32, with the same gate
    res["reduced_precision_vs_fp32"] = {}
    for name, lg in (("onnx-int8", lg8), *extra.items()):
        dba = out["onnx-fp32"]["balanced_accuracy"] - out[name]["balanced_accuracy"]
        dau = out["onnx-fp32"]["macro_auroc"] - out[name]["macro_auroc"]
        res["reduced_precision_vs_fp32"][name] = {
            "balanced_accuracy_drop": round(dba, 4), "macro_auroc_drop": round(dau, 4),
            "predicted_class_agreement": round(float((lg32.argmax(1) == lg.argmax(1)).mean()), 4),
            "max_abs_logit_diff": round(float(np.abs(lg32 - lg).max()), 4),
            "passes_gate": bool(dba <= MAX_BA_DROP and dau <= MAX_AUROC_DROP)}
        a0001 = dicom.get("lung-pet-ct-dx-a0001")
        if a0001:
            auc = a0001["tumour_slice_auroc"]
            drop = round(auc["onnx-fp32"] - auc[name], 4)
            res["reduced_precision_vs_fp32"][name]["a0001_tumour_slice_auroc_drop"] = drop
            res["reduced_precision_vs_fp32"][name]["passes_gate"] &= bool(drop <= MAX_DICOM_AUROC_DROP)
    # one calibration serves both int8 backends; it lists those that passed, the others refuse it
    validated = [k_ for k_, v in res["reduced_precision_vs_fp32"].items() if "int8" in k_ and v["passes_gate"]]
    ship = bool(validated)
    res["gate"] = {"max_balanced_accuracy_drop": MAX_BA_DROP, "max_macro_auroc_drop": MAX_AUROC_DROP,
                   "max_a0001_tumour_slice_auroc_drop": MAX_DICOM_AUROC_DROP if dicom else None,
                   "shipped": ship, "validated": validated,
                   "decision": (f"int8 shipped for {', '.join(f'--backend {v}' for v in validated)}" if ship else
                                "int8 NOT shipped: accuracy drop above the gate; fp32 only")
                   + ("" if dicom or bundle.organ != "lung" else " (8-bit test only: no DICOM gate run)")}
    cal_file = ob.calibration_path(bundle)
    if write:                       # the bundle's int8 calibration: only when shipped
        if ship:
            payload = {"sha256": bundle.sha256, "created_by": "benchmarks/int8_eval.py", "validated": validated,
                       "float_nodes": float_nodes,
                       "quantization": res["calibration"], "gate": res["gate"],
                       "int8_vs_fp32": res["int8_vs_fp32"], "metrics": out, "tensors": tensors}
            tmp = cal_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(payload) + "\n")
            tmp.replace(cal_file)
            res["gate"]["calibration_file"] = str(cal_file)
        elif cal_file.exists():
            cal_file.unlink()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(res, RESULTS / f"int8-{bundle.name}{'' if write else '-dry-run'}.json")
    return res


def openvino_backends(bundle, fp32_path, int8_path, log=print) -> dict:
    """The OpenVINO variants (fp32, bf16 where native, int8 on the same QDQ file); empty when
    OpenVINO is not installed."""
    try:
        from dicompipe.model import openvino_backend as vb
    except ImportError as e:
        log(f"OpenVINO not measured: {e}")
        return {}
    out = {"openvino-fp32": vb.OpenVinoBackend(bundle, "cpu", "fp32", path=fp32_path),
           "openvino-int8": vb.OpenVinoBackend(bundle, "cpu", "int8", path=int8_path)}
    if vb.native_bf16():
        out["openvino-bf16"] = vb.OpenVinoBackend(bundle, "cpu", "bf16", path=fp32_path)
    return out


def report(res: dict) -> str:
    rows = [[k, f"{v['balanced_accuracy']:.4f}", f"{v['macro_auroc']:.4f}"]
            for k, v in res["metrics"].items()]
    d = res["int8_vs_fp32"]
    return "\n".join([
        table(rows, [f"{res['bundle']} test n={res['test_slices']}", "balanced acc", "macro AUROC"]),
        f"int8 - fp32: balanced accuracy drop {d['balanced_accuracy_drop']:+.4f} "
        f"(paired 95% CI of int8-fp32 {d['balanced_accuracy_diff_ci95']}), macro AUROC drop "
        f"{d['macro_auroc_drop']:+.4f} (CI {d['macro_auroc_diff_ci95']}), class agreement "
        f"{d['predicted_class_agreement']:.3f}",
        *( [f"torch vs ONNX fp32: identical classes {res['onnx_vs_torch']['identical_predicted_classes']}, "
            f"max |logit diff| {res['onnx_vs_torch']['max_abs_logit_diff']:.2e}"] if "onnx_vs_torch" in res else []),
        *[f"{k} - onnx-fp32: balanced accuracy drop {v['balanced_accuracy_drop']:+.4f}, macro "
          f"AUROC drop {v['macro_auroc_drop']:+.4f}, class agreement "
          f"{v['predicted_class_agreement']:.3f}, passes gate {v['passes_gate']}"
          for k, v in res.get("reduced_precision_vs_fp32", {}).items() if k != "onnx-int8"],
        *[f"{series}: tumour-slice AUROC {', '.join(f'{k} {v}' for k, v in d['tumour_slice_auroc'].items())}"
          for series, d in res.get("dicom", {}).items()],
        f"gate (BA drop <= {MAX_BA_DROP}, AUROC drop <= {MAX_AUROC_DROP}"
        + (f", a0001 tumour-slice AUROC drop <= {MAX_DICOM_AUROC_DROP}" if res.get("dicom") else "")
        + f"): {res['gate']['decision']}"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="lung-resnet50")
    ap.add_argument("--data", default=None, help="default: ../shared/data/<organ set>")
    ap.add_argument("--calib", type=int, default=300)
    ap.add_argument("--workdir", default="training", help="where the trainer's image cache lives")
    ap.add_argument("--dry-run", action="store_true", help="do not write the int8 calibration into the bundle")
    ap.add_argument("--allow-untrained", action="store_true")
    ap.add_argument("--skip-torch", action="store_true", help="skip the torch-vs-ONNX check")
    ap.add_argument("--calib-extra", nargs="+", default=[], metavar="SERIES",
                    help="DICOM series (training data, e.g. the bundle's --extra-normals) whose "
                         "rendered slices join the calibration set")
    ap.add_argument("--quantize-classifier", action="store_true",
                    help="quantize the classifier too (default: it stays float)")
    ap.add_argument("--dicom-data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="folder holding lung-pet-ct-dx-a0001 (and lidc-idri-0001): lung int8 must "
                         "keep the tumour-slice AUROC there (default ../shared/data)")
    ap.add_argument("--no-dicom-gate", action="store_true", help="gate on the 8-bit test split alone")
    a = ap.parse_args(argv)
    from dicompipe.model.bundle import load_bundle
    b = load_bundle(a.bundle, allow_untrained=a.allow_untrained)
    data = Path(a.data) if a.data else DEFAULT_DATA[b.organ]
    if not data.exists():
        sys.exit(f"{data} not found: pass --data")
    res = run(b, data, a.calib, a.workdir, write=not a.dry_run, torch_check=not a.skip_torch,
              calib_extra=a.calib_extra, quantize_classifier=a.quantize_classifier,
              dicom_data=None if a.no_dicom_gate or not a.dicom_data.exists() else a.dicom_data)
    print(report(res))
    return res


if __name__ == "__main__":
    main()
