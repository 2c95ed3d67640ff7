"""Does the lung network need what lies outside the lungs? A test-time probe, no training.

The shipped lung network scores each slice as it was trained (the body-cropped slice). Here
the same network also scores each slice with everything outside the lung fields set to
background, the fields widened by half (or one) class-map cell:

- on the shared chest DICOM (``lung-pet-ct-dx-a0001``, ``lidc-idri-0001``; HU lung fields,
  ``preprocess.region.lung_fields``): per-slice AUROC of P(malignant), tumour slices vs the
  rest, and the slice with the highest P, plain and masked;
- on the IQ-OTH/NCCD leak-free test part (8-bit; intensity lung fields,
  ``preprocess.region.gray_lung_fields``): macro AUROC and malignant-vs-normal AUROC, plain and masked.

A masked slice is unlike anything the network was trained on, so this says what a network
*trained* on lung-only input might do, not what to ship.

Run: ``python -m benchmarks.masked_input_probe [--out FILE]`` (reads ``../shared/data``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from benchmarks import real_ct as rc
from dicompipe import organs
from dicompipe.types import softmax

ROOT = Path(__file__).resolve().parent.parent


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from dicompipe.train.metrics import macro_auroc
    return round(float(macro_auroc(y.astype(int), np.stack([-s, s], 1))), 4)


def dicom_part(bundle, run, name: str, margin_cells: float) -> dict:
    """P(malignant) of every analysed slice of a shared chest series, plain and lung-masked."""
    from dicompipe.preprocess.region import lung_fields, model_space
    cfg = organs.get("lung")
    a = rc.analyse(rc.DATA / rc.SERIES[name][0], "lung", bundle)
    batch = a.batch
    spacing = float(batch.grid.GetSpacing()[0])
    margin = int(batch.pad[2]) * spacing * margin_cells / a.cams.maps.shape[-1]
    fields, step = lung_fields(sitk.GetArrayViewFromImage(batch.grid), spacing, margin,
                               air_hu=cfg.selection.lung_air_hu[1], body_hu=cfg.selection.body_hu)
    m = model_space(batch, fields, step)[:, None]
    x = np.asarray(batch.tensors, np.float32)
    masked = (x * m + x[:, :, :1, :1] * (1 - m)).astype(np.float32)   # corner = background
    logits = np.concatenate([run(masked[i:i + 16])[0] for i in range(0, len(masked), 16)])
    k = bundle.labels.index("malignant")
    p_masked = softmax(logits / a.verdict.temperature)[:, k]
    p = rc.calibrated_p(a, "malignant")
    z_mm = np.array([rc.grid_lps(batch.grid, (s.z, 0, 0))[2] for s in batch.included])
    half = abs(batch.grid.GetSpacing()[2]) / 2
    if name == "lidc-idri-0001":         # the z range of the readers' outline, from their XML
        lo, hi = rc.lidc_check(a, rc.DATA / name / "annotations.xml")["nodule_z_mm"]
    else:
        lo, hi = rc.box_z_range(rc.DATA / name / "tumour_boxes.json")
    y = (z_mm >= lo - half) & (z_mm <= hi + half)
    top = lambda s: round(float(z_mm[int(np.argmax(s))]), 1)      # noqa: E731
    return {"series": name, "margin_cells": margin_cells, "n_slices": int(len(p)),
            "n_tumour_slices": int(y.sum()), "slice_auroc_p": _auroc(y, p),
            "slice_auroc_p_masked": _auroc(y, p_masked), "highest_p_slice_z_mm": top(p),
            "highest_p_slice_z_mm_masked": top(p_masked), "tumour_z_mm": [lo, hi]}


def iq_oth_part(bundle, cells: int, margin_cells: float = 0.5) -> list[dict]:
    """The leak-free IQ-OTH/NCCD test part, plain and with the intensity lung fields only
    (widened by ``margin_cells`` of a class map of ``cells`` x ``cells``)."""
    import torch

    from dicompipe.preprocess.region import gray_lung_fields as lung_fields
    from dicompipe.train import data as D
    from dicompipe.train.metrics import macro_auroc
    from dicompipe.train.train import predict_logits
    root = rc.DATA / "iq-othnccd"
    items, labels = D.scan(root, "lung")
    parts = json.loads((Path(bundle.path) / "docs" / "split.json").read_text())["parts"]
    test = [it for it in items if parts.get(os.path.relpath(it.path, root)) == "test"]
    y = np.array([it.label for it in test])
    images = D.build_cache(test, bundle.spec, None, log=None)
    grow = max(1, round(bundle.spec.size * margin_cells / cells))
    masks = np.stack([ndimage.binary_dilation(lung_fields(g / 255.0), iterations=grow) for g in images])
    net = bundle.network()
    torch.set_num_threads(2)
    mal, nor = labels.index("malignant"), labels.index("normal")
    keep = (y == mal) | (y == nor)
    out = []
    for tag, imgs in (("plain", images), ("lung-masked", (images * masks).astype(np.uint8))):
        p = softmax(predict_logits(net, imgs, bundle.spec) / bundle.temperature)
        out.append({"input": tag, "n": int(len(y)), "macro_auroc": round(float(macro_auroc(y, p)), 4),
                    "auroc_malignant_vs_normal": _auroc((y[keep] == mal), p[keep, mal]),
                    "share_of_pixels_kept": round(float(masks.mean()), 3) if tag != "plain" else 1.0})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    from dicompipe.model import load_bundle
    from dicompipe.model.backends import get_backend
    bundle = load_bundle("lung-resnet50", organ="lung")
    run = get_backend(bundle, "auto", "cpu")
    spec = bundle.spec
    cells = int(run(np.zeros((1, spec.channels, spec.size, spec.size), np.float32))[1].shape[-1])
    res = {"bundle": f"{bundle.name} {bundle.version}", "dicom": [
        dicom_part(bundle, run, name, m) for name in ("lung-pet-ct-dx-a0001", "lidc-idri-0001")
        for m in (0.5, 1.0)], "iq_oth_test": iq_oth_part(bundle, cells)}
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
