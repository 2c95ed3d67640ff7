"""Does P(malignant) follow the lesion evidence? A lung bundle's head against heads refitted
on the Grad-CAM mass, on IQ-OTH/NCCD and on the shared chest DICOM.

The malignant Grad-CAM's mass per slice ranks the lung-pet-ct-dx-a0001 tumour slices better
than the bundle's P(malignant) (``benchmarks.real_ct``). Here the bundle's backbone is kept
and only small heads over per-slice features are refitted on the IQ-OTH/NCCD **validation**
part (NLL, then the trainer's prior correction and temperature), then scored on its
leak-free test part and on the DICOM series (never used for fitting):

- ``bundle``: the shipped head (mean of each class map + bias);
- ``evidence``: each class's logit = scale x its CAM mass (mean of the ReLU'd class map,
  the map Grad-CAM shows) + bias;
- ``malignant evidence``: normal and benign as shipped (one common scale), malignant from
  its CAM mass.

Figures per head: test macro AUROC (and each class's one-vs-rest AUROC), balanced accuracy,
malignant sensitivity, ECE; on a0001
the tumour-slice AUROC of P(malignant) and whether the most malignant slice is a tumour
slice; the same on lidc-idri-0001 with the slices of the readers' outline (malignancy >= 4).

Run: ``python -m benchmarks.evidence_head [--lung BUNDLE] [--out FILE]`` (reads ../shared/data).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.real_ct import DATA, ROOT, box_z_range, lesion_slices

HEADS = ("bundle", "evidence", "malignant evidence")


def head_logits(name: str, p: np.ndarray, logits: np.ndarray, mass: np.ndarray, mal: int) -> np.ndarray:
    """The logits of head ``name`` with parameters ``p`` from the bundle's ``logits`` and the
    per-class CAM ``mass`` (n, k)."""
    k = logits.shape[1]
    if name == "evidence":
        return mass * np.exp(p[:k]) + p[k:]
    if name == "malignant evidence":
        out = logits * np.exp(p[0]) + p[1:k + 1]      # (the malignant bias here is replaced:)
        out[:, mal] = mass[:, mal] * np.exp(p[k + 1]) + p[k + 2]
        return out
    return logits


def n_params(name: str, k: int) -> int:
    return {"evidence": 2 * k, "malignant evidence": k + 3}.get(name, 0)


def fit_head(name: str, logits, mass, y, mal: int) -> np.ndarray:
    """Head parameters minimising the validation NLL (L-BFGS from the identity-like start)."""
    from scipy.optimize import minimize
    n = n_params(name, logits.shape[1])
    if not n:
        return np.zeros(0)

    def nll(p):
        z = head_logits(name, p, logits, mass, mal)
        z = z - z.max(1, keepdims=True)
        return -np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))
    return minimize(nll, np.zeros(n), method="L-BFGS-B").x


def features(net, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits, CAM mass per class) of model inputs ``x`` (n, c, s, s) float32."""
    import torch

    from dicompipe.explain.gradcam import class_maps
    from dicompipe.model.network import forward_with_features
    w = net.fc.weight.detach().numpy()
    lg, ms = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits, a = forward_with_features(net, torch.from_numpy(x[i:i + batch]))
            lg.append(logits.numpy()), ms.append(class_maps(a.numpy(), w).mean((2, 3)))
    return np.concatenate(lg), np.concatenate(ms)


def iq_inputs(bundle, data: Path) -> dict:
    """IQ-OTH/NCCD validation and test parts of the bundle's stored split, rendered as the
    bundle renders them (the trainer's cache), as model inputs."""
    import torch

    from dicompipe.train import data as D
    from dicompipe.train.run import rendered_split
    spec = bundle.spec
    images, y, part, labels = rendered_split(data / "iq-othnccd", "lung", Path(bundle.path) / "docs" / "split.json",
                                             spec, ROOT / "training", log=None)
    out = {"labels": labels}
    for p in ("val", "test"):
        x = D.to_input(torch.from_numpy(images[part == p]), spec, spec.size).numpy()
        out[p] = (x, y[part == p])
    return out


def dicom_inputs(bundle, data: Path) -> dict:
    """Model inputs of a0001 and LIDC-IDRI-0001 as inference renders them, with the slices
    that hold the tumour (z inside the boxes) or the outlined nodule (malignancy >= 4)."""
    from benchmarks.cam_lidc import lps_points, nodule_masks, parse_lidc
    from dicompipe import io, preprocess
    out = {}
    for name in ("lung-pet-ct-dx-a0001", "lidc-idri-0001"):
        if not (data / name / "series").exists():
            continue
        vol = io.load(io.select(io.discover(data / name / "series")))
        batch = preprocess.prepare(vol, bundle.spec, organ="lung")
        if name.startswith("lung-pet"):
            z_range = box_z_range(data / name / "tumour_boxes.json")
        else:
            nod = [n for n in nodule_masks(vol, parse_lidc(data / name / "annotations.xml"))
                   if (n["malignancy"] or 0) >= 4]
            zs = lps_points(vol.image, np.argwhere(np.any([n["mask"] for n in nod], axis=0)))[:, 2]
            z_range = (float(zs.min()), float(zs.max()))
        out[name] = (np.asarray(batch.tensors, np.float32), lesion_slices(batch, *z_range)[1].astype(int))
    return out


def run(lung=None, data: Path = DATA) -> dict:
    import torch

    from dicompipe.model.bundle import load_bundle
    from dicompipe.train.calibration import calibrate
    from dicompipe.train.metrics import auroc, classification_metrics
    from dicompipe.train.run import fit_prior_bias
    from dicompipe.types import softmax
    torch.set_num_threads(2)
    b = load_bundle(lung or "lung-resnet50", organ="lung", allow_untrained=True)
    net = b.network().eval()
    iq = iq_inputs(b, data)
    labels = iq["labels"]
    mal = labels.index("malignant")
    (xv, yv), (xt, yt) = iq["val"], iq["test"]
    (lv, mv), (lt, mt) = features(net, xv), features(net, xt)
    dic = {n: (*features(net, x), f) for n, (x, f) in dicom_inputs(b, data).items()}
    res: dict = {"bundle": f"{b.name} {b.version}", "sha256": b.sha256, "fitted_on":
                 f"iq-othnccd validation part ({len(yv)} slices)", "heads": {}}
    for name in HEADS:
        p = fit_head(name, lv, mv, yv, mal)
        zv = head_logits(name, p, lv, mv, mal)
        if name == "bundle":     # as shipped: its prior correction is in the head, its T in metadata
            bias, T = np.zeros(len(labels)), b.temperature
        else:
            bias = fit_prior_bias(zv, yv, positive=mal)
            T, _ = calibrate(zv + bias, yv)
        m = classification_metrics(yt, softmax((head_logits(name, p, lt, mt, mal) + bias) / T, np.float64),
                                   labels, n_boot=1000)
        rec = {k: round(float(m[k]), 4) for k in ("macro_auroc", "balanced_accuracy", "sensitivity_malignant", "ece",
                                                   *(f"auroc_{c}" for c in labels))}
        rec["macro_auroc_ci95"] = [round(float(v), 4) for v in m["macro_auroc_ci95"]]
        for series, (lg, ms, flag) in dic.items():
            pm = softmax((head_logits(name, p, lg, ms, mal) + bias) / T, np.float64)[:, mal]
            rec[series] = {"slice_auroc_malignant": round(float(auroc(flag, pm)), 4),
                           "most_malignant_slice_holds_the_lesion": bool(flag[int(np.argmax(pm))]),
                           "n_slices": int(len(flag)), "n_lesion_slices": int(flag.sum())}
        res["heads"][name] = rec
        print(name, json.dumps(rec), flush=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lung", help="lung bundle folder (default: built-in)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    res = run(args.lung, args.data)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
