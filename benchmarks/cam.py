"""What Grad-CAM costs: forward-only vs forward + CAM for every included slice of a
300-slice synthetic study, the 3D assembly onto the CT grid, and the autograd path.

- forward-only: the bundle's fused channels_last ResNet50 returning logits only;
- forward + CAM: ``model.predict`` (logits + layer4 kept) then ``explain.gradcam`` (closed
  form, all classes); the two forwards are interleaved batch by batch so that background
  load hits both alike;
- 3D: ``preprocess.to_volume`` for every class (what ``gradcam(volumes=True)`` adds);
- autograd: ``explain.autograd_cam`` (forward with autograd + one gradient per class, what
  pytorch-grad-cam does) on a subset of slices, against the forward on the same slices.

Weights: the built-in lung bundle when it exists, else seeded random weights (timing does
not depend on them). Run: ``python -m benchmarks.cam [--slices 300] [--autograd 24]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from dicompipe import explain, preprocess
from dicompipe import model as model_stage
from dicompipe.model.network import resnet50
from dicompipe.types import InstanceRef, PreprocessSpec, SeriesInfo, Volume


def synthetic_volume(n_slices: int, size: int = 512, spacing=(0.7, 0.7, 1.0)) -> Volume:
    """A chest-like HU volume: body ellipse, two lungs, a nodule; LPS geometry."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    body = (yy / 0.38) ** 2 + (xx / 0.46) ** 2 <= 1
    lungs = (((yy + 0.02) / 0.27) ** 2 + ((np.abs(xx) - 0.2) / 0.15) ** 2) <= 1
    sl = np.where(body, 40.0, -1000.0)
    sl = np.where(lungs, -850.0, sl).astype(np.float32)
    arr = np.repeat(sl[None], n_slices, axis=0)
    zz = np.arange(n_slices)[:, None, None]
    nod = ((zz - n_slices // 2) / 6.0) ** 2 + ((yy - 0.0) / 0.02) ** 2 + ((xx - 0.2) / 0.02) ** 2 <= 1
    arr[nod] = 30.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-size * spacing[0] / 2, -size * spacing[1] / 2, -300.0))
    series = SeriesInfo(key="synthetic", kind="nifti", source="synthetic")
    return Volume(image=img, slices=[[InstanceRef(file=f"z{z}")] for z in range(n_slices)],
                  series=series)


def get_bundle(work: Path):
    try:
        b = model_stage.load_bundle("lung-resnet50", organ="lung", allow_untrained=True)
        return b, f"built-in bundle {b.name} {b.version} (trained={b.trained})"
    except Exception as e:                                       # noqa: BLE001 - fall back
        why = str(e).split(".")[0]
    from dicompipe.model.bundle import save_bundle
    torch.manual_seed(0)
    net = resnet50(num_classes=3).eval()
    md = {"name": "bench-lung-resnet50", "version": "0.0.0", "organ": "lung",
          "labels": ["normal", "benign", "malignant"], "positive_labels": ["malignant"],
          "preprocessing": PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)]),
          "trained": False, "training": {"data": "none: seeded random weights (timing only)"}}
    path = save_bundle(work / "bench-bundle", net, md, dtype="float32")
    return (model_stage.load_bundle(path, allow_untrained=True),
            f"seeded random ResNet50 weights (no lung bundle: {why})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--autograd", type=int, default=24, help="slices for the autograd path")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cam-bench-"))
    bundle, weights = get_bundle(work)
    spec = bundle.spec
    vol = synthetic_volume(args.slices)
    t = time.perf_counter()
    batch = preprocess.prepare(vol, spec, select_slices=False)
    t_prep = time.perf_counter() - t
    n = len(batch.included)

    # forward-only module: the backend's fused channels_last network, logits only
    from dicompipe.model.backends import get_backend
    backend = get_backend(bundle, "torch", "cpu")
    plain = copy.deepcopy(bundle.network()).eval()
    from torch.fx.experimental.optimization import fuse
    plain = fuse(plain, inplace=True).to(memory_format=torch.channels_last).eval()

    def forward_only(xb):
        with torch.inference_mode():
            return plain(torch.from_numpy(np.ascontiguousarray(xb)).to(
                memory_format=torch.channels_last)).numpy()

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    forward_only(batch.tensors[:2])
    backend(batch.tensors[:2])                      # warm-up both
    t_fwd = t_fwd_feat = 0.0
    logits, feats = [], []
    for i in range(0, n, args.batch_size):
        xb = batch.tensors[i:i + args.batch_size]
        t = time.perf_counter()
        forward_only(xb)
        t_fwd += time.perf_counter() - t
        t = time.perf_counter()
        lg, a = backend(xb)
        t_fwd_feat += time.perf_counter() - t
        logits.append(lg)
        feats.append(a)
    from dicompipe.model.aggregate import softmax
    net = bundle.network()
    lg = np.concatenate(logits)
    from dicompipe.types import SlicePredictions
    preds = SlicePredictions(labels=bundle.labels, logits=lg, probabilities=softmax(lg),
                             features=np.concatenate(feats),
                             head_weight=net.fc.weight.detach().numpy().copy(),
                             head_bias=net.fc.bias.detach().numpy().copy(), batch=batch)
    cam_runs = []
    for _ in range(3):
        t = time.perf_counter()
        cams = explain.gradcam(preds, volumes=False)
        cam_runs.append(time.perf_counter() - t)
    t_cam = float(np.median(cam_runs))
    t = time.perf_counter()
    vols = {l: preprocess.to_volume(batch, cams.maps[:, k]) for k, l in enumerate(cams.labels)}
    t_3d = time.perf_counter() - t

    # autograd path on a subset, against the forward on the same slices
    m = min(args.autograd, n)
    sub = torch.from_numpy(batch.tensors[:m])
    net_ag = copy.deepcopy(net).eval()
    t_sub_fwd, t_ag = 0.0, 0.0
    for i in range(0, m, 8):
        t = time.perf_counter()
        forward_only(batch.tensors[i:i + 8])
        t_sub_fwd += time.perf_counter() - t
        t = time.perf_counter()
        ag = explain.autograd_cam(net_ag, sub[i:i + 8], batch_size=8)
        t_ag += time.perf_counter() - t
    agree = np.abs(explain.normalise_like_grad_cam(ag, spec.size)
                   - explain.normalise_like_grad_cam(cams.maps[m - len(ag):m], spec.size)).max()

    res = {
        "machine": f"{platform.processor() or platform.machine()}, {threads} CPU threads "
                   f"(shared with other jobs), torch {torch.__version__}",
        "weights": weights,
        "study": f"{args.slices} slices 512x512 synthetic chest, {n} included, "
                 f"model input {spec.size}x{spec.size}, {len(bundle.labels)} classes",
        "prepare_s": round(t_prep, 2),
        "forward_only_s": round(t_fwd, 2),
        "forward_keep_layer4_s": round(t_fwd_feat, 2),
        "cam_closed_form_all_classes_s": round(t_cam, 4),
        "cam_overhead_pct": round(100 * (t_fwd_feat + t_cam - t_fwd) / t_fwd, 2),
        "cam_maps_only_pct_of_forward": round(100 * t_cam / t_fwd, 3),
        "cam_3d_all_classes_s": round(t_3d, 2),
        "cam_with_3d_overhead_pct": round(100 * (t_fwd_feat + t_cam + t_3d - t_fwd) / t_fwd, 2),
        "autograd_slices": m,
        "autograd_all_classes_s": round(t_ag, 2),
        "forward_same_slices_s": round(t_sub_fwd, 2),
        "autograd_cost_x_forward": round(t_ag / t_sub_fwd, 2),
        "autograd_extrapolated_all_slices_s": round(t_ag * n / m, 1),
        "closed_vs_autograd_max_abs_diff_normalised": float(agree),
        "cam_volume_size_xyz": list(vols[cams.labels[0]].GetSize()),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
