"""Does the lung network need what lies outside the lungs? A test-time probe, no training.

The shipped lung network scores each slice as it was trained (the body-cropped slice). Here
the same network also scores each slice with everything outside the lung fields set to
background, the fields widened by half (or one) class-map cell:

- on the shared chest DICOM (``lung-pet-ct-dx-a0001``, ``lidc-idri-0001``; HU lung fields,
  ``preprocess.region.lung_fields``): per-slice AUROC of P(malignant), tumour slices vs the
  rest, and the slice with the highest P, plain and masked;
- on the IQ-OTH/NCCD leak-free test part (8-bit; intensity lung fields,
  ``preprocess.region.gray_lung_fields``): macro AUROC and malignant-vs-normal AUROC, plain and masked.

A masked slice is unlike anything the shipped network was trained on, so this says what a
network *trained* on lung-only input might do, not what to ship.

``--bundle B --region trained`` is for a network trained with ``--region-dropout``, which saw
both views: the masked view is then the one it trained on (the bundle's pipeline with
``input_region = "lung_fields"``, :func:`dicompipe.preprocess.render.keep_region`), and every
figure also comes for the mean of the two views' P ("two_view").

Run: ``python -m benchmarks.masked_input_probe [--bundle B] [--region fields|trained] [--out FILE]``
(reads ``../shared/data``).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
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


def trained_region(bundle):
    """The bundle seeing its input through the lung fields, as ``--region-dropout`` trains it."""
    pre = {**bundle.metadata.get("preprocessing", {}), "input_region": "lung_fields"}
    return replace(bundle, metadata={**bundle.metadata, "preprocessing": pre})


def dicom_part(bundle, run, name: str, margin_cells: float | None) -> dict:
    """P(malignant) of every analysed slice of a shared chest series, plain and lung-masked
    (``margin_cells`` None: the bundle's trained region, see :func:`trained_region`)."""
    from dicompipe.preprocess.region import lung_fields, model_space
    cfg = organs.get("lung")
    a = rc.analyse(rc.DATA / rc.SERIES[name][0], "lung", bundle)
    batch = a.batch
    p = rc.calibrated_p(a, "malignant")
    if margin_cells is None:
        b = rc.analyse(rc.DATA / rc.SERIES[name][0], "lung", trained_region(bundle))
        if [s.z for s in b.batch.included] != [s.z for s in batch.included]:
            raise RuntimeError(f"{name}: the two views analysed different slices")
        p_masked = rc.calibrated_p(b, "malignant")
    else:
        spacing = float(batch.grid.GetSpacing()[0])
        margin = int(batch.pad[2]) * spacing * margin_cells / a.cams.maps.shape[-1]
        fields, step = lung_fields(sitk.GetArrayViewFromImage(batch.grid), spacing, margin,
                                   air_hu=cfg.selection.lung_air_hu[1], body_hu=cfg.selection.body_hu)
        m = model_space(batch, fields, step)[:, None]
        x = np.asarray(batch.tensors, np.float32)
        masked = (x * m + x[:, :, :1, :1] * (1 - m)).astype(np.float32)   # corner = background
        logits = np.concatenate([run(masked[i:i + 16])[0] for i in range(0, len(masked), 16)])
        p_masked = softmax(logits / a.verdict.temperature)[:, bundle.labels.index("malignant")]
    two_view = (p + p_masked) / 2
    z_mm = np.array([rc.grid_lps(batch.grid, (s.z, 0, 0))[2] for s in batch.included])
    half = abs(batch.grid.GetSpacing()[2]) / 2
    if name == "lidc-idri-0001":         # the z range of the readers' outline, from their XML
        lo, hi = rc.lidc_check(a, rc.DATA / name / "annotations.xml")["nodule_z_mm"]
    else:
        lo, hi = rc.box_z_range(rc.DATA / name / "tumour_boxes.json")
    y = (z_mm >= lo - half) & (z_mm <= hi + half)
    top = lambda s: round(float(z_mm[int(np.argmax(s))]), 1)      # noqa: E731
    return {"series": name, "margin_cells": margin_cells if margin_cells is not None else "trained region",
            "n_slices": int(len(p)), "n_tumour_slices": int(y.sum()), "slice_auroc_p": _auroc(y, p),
            "slice_auroc_p_masked": _auroc(y, p_masked), "slice_auroc_p_two_view": _auroc(y, two_view),
            "highest_p_slice_z_mm": top(p), "highest_p_slice_z_mm_masked": top(p_masked),
            "highest_p_slice_z_mm_two_view": top(two_view), "tumour_z_mm": [lo, hi]}


def iq_oth_part(bundle, cells: int, margin_cells: float | None = 0.5) -> list[dict]:
    """The leak-free IQ-OTH/NCCD test part, plain and with the intensity lung fields only
    (widened by ``margin_cells`` of a class map of ``cells`` x ``cells``; None: the bundle's
    trained region), and the mean of the two views."""
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
    if margin_cells is None:
        masked, kept = D.build_cache(test, trained_region(bundle).spec, None, log=None), None
    else:
        grow = max(1, round(bundle.spec.size * margin_cells / cells))
        masks = np.stack([ndimage.binary_dilation(lung_fields(g / 255.0), iterations=grow) for g in images])
        masked, kept = (images * masks).astype(np.uint8), round(float(masks.mean()), 3)
    net = bundle.network()
    torch.set_num_threads(2)
    mal, nor = labels.index("malignant"), labels.index("normal")
    keep = (y == mal) | (y == nor)
    probs = {tag: softmax(predict_logits(net, imgs, bundle.spec) / bundle.temperature)
             for tag, imgs in (("plain", images), ("lung-masked", masked))}
    probs["two-view mean"] = (probs["plain"] + probs["lung-masked"]) / 2
    return [{"input": tag, "n": int(len(y)), "macro_auroc": round(float(macro_auroc(y, p)), 4),
             "auroc_malignant_vs_normal": _auroc((y[keep] == mal), p[keep, mal]),
             "share_of_pixels_kept": {"plain": 1.0, "lung-masked": kept}.get(tag)}
            for tag, p in probs.items()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="lung-resnet50", help="lung bundle name or folder")
    ap.add_argument("--region", choices=("fields", "trained"), default="fields",
                    help="fields: the lung fields widened by half / one class-map cell (a probe of "
                         "an unmasked network); trained: the bundle's own lung-only view, as "
                         "--region-dropout trains it")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    from dicompipe.model import load_bundle
    from dicompipe.model.backends import get_backend
    bundle = load_bundle(args.bundle, organ="lung")
    run = get_backend(bundle, "auto", "cpu")
    spec = bundle.spec
    cells = int(run(np.zeros((1, spec.channels, spec.size, spec.size), np.float32))[1].shape[-1])
    margins = (0.5, 1.0) if args.region == "fields" else (None,)
    res = {"bundle": f"{bundle.name} {bundle.version}", "region": args.region, "dicom": [
        dicom_part(bundle, run, name, m) for name in ("lung-pet-ct-dx-a0001", "lidc-idri-0001")
        for m in margins], "iq_oth_test": iq_oth_part(bundle, cells, margins[0])}
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
