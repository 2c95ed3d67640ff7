"""The straightforward script a researcher would write for the same study: the reference that
``benchmarks.e2e_cli`` times ``dicompipe analyze`` against.

pydicom reads every file, slices are sorted by position and converted to HU, each slice is
windowed with the bundle's window, resized with torch and classified by the bundle's ResNet50
in eager torch; Grad-CAM for every class comes from autograd (hooks on layer4, one backward
pass per class); the verdict is the mean of the top-5 slice probabilities; it writes a
report.txt, a slice-score plot, five key-slice overlays (matplotlib), and NIfTI files of the
CT and of each class's map on the CT grid (float32, nibabel defaults). Same bundle weights,
same outputs as dicompipe's default formats; no caching, no threads beyond torch's own.

Run: ``python -m benchmarks.naive STUDY_DIR OUT_DIR [--bundle lung-resnet50]``.
"""
from __future__ import annotations

import argparse
import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dicompipe.model import load_bundle  # noqa: E402  (the weights only)


def read_series(folder):
    dss = [pydicom.dcmread(f) for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
           if os.path.isfile(f) and not os.path.basename(f).startswith(".")]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    sx, sy = (float(v) for v in dss[0].PixelSpacing)
    sz = abs(float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2]))
    return hu.astype(np.float32), (sx, sy, sz), [float(v) for v in dss[0].ImagePositionPatient]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("out")
    ap.add_argument("--bundle", default="lung-resnet50")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    bundle = load_bundle(a.bundle)
    spec, labels = bundle.spec, bundle.labels
    net = bundle.network().eval()
    hu, spacing, origin = read_series(a.study)

    level, width = spec.windows[0]
    x = np.clip((hu - (level - width / 2)) / width, 0, 1)
    xt = F.interpolate(torch.from_numpy(x)[:, None], size=(spec.size, spec.size), mode="bilinear")
    xt = ((xt - spec.mean) / spec.std).repeat(1, 3, 1, 1)

    acts = {}
    net.layer4.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    probs, cams = [], []
    for s in range(0, len(xt), 16):
        logits = net(xt[s:s + 16])
        a4 = acts["a"]
        maps = []
        for c in range(len(labels)):
            g, = torch.autograd.grad(logits[:, c].sum(), a4, retain_graph=True)
            cam = F.relu((g.mean((2, 3), keepdim=True) * a4).sum(1, keepdim=True))
            maps.append(F.interpolate(cam, size=hu.shape[1:], mode="bilinear")[:, 0])
        cams.append(torch.stack(maps, 1).detach().numpy())
        probs.append(torch.softmax(logits, 1).detach().numpy())
    p, cam = np.concatenate(probs), np.concatenate(cams)          # (n, k), (n, k, y, x)
    top = np.sort(p, 0)[-5:].mean(0)
    verdict = labels[int(np.argmax(top))]
    c = labels.index(verdict)
    keys = np.argsort(-p[:, c])[:5]

    with open(os.path.join(a.out, "report.txt"), "w") as f:
        f.write(f"verdict: {verdict}\n" + "".join(f"  {lb}: {v:.3f}\n" for lb, v in zip(labels, top)))
        f.write("key slices: " + ", ".join(str(int(k)) for k in keys) + "\nResearch use only.\n")
    fig, ax = plt.subplots(figsize=(8, 3))
    for j, lb in enumerate(labels):
        ax.plot(p[:, j], label=lb)
    ax.legend()
    fig.savefig(os.path.join(a.out, "slice_scores.png"), dpi=100)
    plt.close(fig)
    for i, k in enumerate(keys, 1):
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(x[k], cmap="gray")
        ax.imshow(cam[k, c], cmap="jet", alpha=0.4)
        ax.set_title(f"slice {k}: P({verdict}) = {p[k, c]:.2f}")
        ax.axis("off")
        fig.savefig(os.path.join(a.out, f"key_{i:02d}.png"), dpi=100)
        plt.close(fig)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    nib.save(nib.Nifti1Image(np.transpose(hu, (2, 1, 0)), affine), os.path.join(a.out, "ct.nii.gz"))
    for j, lb in enumerate(labels):
        nib.save(nib.Nifti1Image(np.transpose(cam[:, j], (2, 1, 0)), affine),
                 os.path.join(a.out, f"cam_{lb}.nii.gz"))
    print(verdict)


if __name__ == "__main__":
    main()
