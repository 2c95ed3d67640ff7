"""Would a new linear head on the shipped backbone do better? (issue 12 probe)

Refits the lung bundle's head (GAP + linear, so Grad-CAM keeps its closed form) on frozen
pooled layer4 features of the IQ-OTH/NCCD training part: class-balanced cross-entropy plus
``lam * ||W - W_shipped||^2`` (``lam`` large = the shipped head), with and without flipped
copies. For each candidate a prior offset (grid search for validation balanced accuracy)
and a temperature (validation NLL) are fitted on the validation part; the candidate with
the best validation balanced accuracy + macro AUROC is then scored once on the leak-free
test part, next to the shipped head.

Run: ``python -m benchmarks.head_refit [--data ../shared/data/iq-othnccd]``; writes
``benchmarks/results/head_refit_<bundle>-<version>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from benchmarks.common import RESULTS, ROOT, write_json

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "iq-othnccd"
LAMBDAS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def pooled_features(bundle, images, spec) -> tuple[np.ndarray, np.ndarray]:
    """(features, features of the left-right flipped slices), each (n, 2048)."""
    import torch

    from dicompipe.train import data as D
    net = bundle.network().eval()
    got: dict = {}
    net.avgpool.register_forward_hook(lambda m, i, o: got.__setitem__("f", o.flatten(1)))
    plain, flipped = [], []
    with torch.no_grad():
        for a in range(0, len(images), 32):
            x = D.to_input(torch.from_numpy(images[a:a + 32]), spec, spec.size)
            net(x)
            plain.append(got["f"].numpy())
            net(torch.flip(x, [3]))
            flipped.append(got["f"].numpy())
    return np.concatenate(plain), np.concatenate(flipped)


def fit_head(x, y, w0, b0, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced CE + lam * ||W - w0||^2 by L-BFGS, from the shipped head."""
    import torch
    xt, yt, w0t = torch.tensor(x), torch.tensor(y), torch.tensor(w0)
    weight = torch.tensor(len(y) / (len(w0) * np.bincount(y, minlength=len(w0))), dtype=torch.float32)
    w, b = w0t.clone().requires_grad_(), torch.tensor(b0).requires_grad_()
    opt = torch.optim.LBFGS([w, b], max_iter=400, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = torch.nn.functional.cross_entropy(xt @ w.T + b, yt, weight=weight) + lam * ((w - w0t) ** 2).sum()
        out.backward()
        return out
    opt.step(loss)
    return w.detach().numpy(), b.detach().numpy()


def main(argv=None) -> dict:
    from dicompipe.model import load_bundle
    from dicompipe.model.aggregate import softmax
    from dicompipe.train.calibration import fit_temperature
    from dicompipe.train.metrics import classification_metrics
    from dicompipe.train.run import fit_prior_bias
    from dicompipe.train.train import load_data
    from dicompipe.types import PreprocessSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="lung-resnet50")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--workdir", default="training", help="where the trainer's image cache lives")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(2)
    b = load_bundle(args.bundle)
    labels = list(b.metadata["labels"])
    spec = PreprocessSpec.from_dict(b.metadata["preprocessing"])
    items, _, images, spec = load_data(args.data, b.metadata["organ"], None, spec=spec, workdir=args.workdir)
    split = json.loads((b.path / "docs" / "split.json").read_text())["parts"]
    parts = np.array([split.get(os.path.relpath(it.path, args.data)) for it in items], dtype=object)
    keep = np.nonzero(parts != None)[0]  # noqa: E711 - elementwise on an object array
    y, parts = np.array([items[i].label for i in keep]), parts[keep]
    t0 = time.time()
    f, ff = pooled_features(b, images[keep], spec)
    w0, b0 = b.head()
    tr, va, te = (parts == p for p in ("train", "val", "test"))
    candidates = []
    for flips in (False, True):
        x = np.concatenate([f[tr], ff[tr]]) if flips else f[tr]
        yy = np.concatenate([y[tr], y[tr]]) if flips else y[tr]
        for lam in LAMBDAS:
            w, bias = fit_head(x, yy, w0, b0, lam)
            zv = f[va] @ w.T + bias
            off = fit_prior_bias(zv, y[va], positive=labels.index("malignant"))
            t = fit_temperature(zv + off, y[va])
            mv = classification_metrics(y[va], softmax((zv + off) / t), labels, n_boot=0)
            candidates.append({"flips": flips, "lam": lam,
                               "val_balanced_accuracy": round(mv["balanced_accuracy"], 4),
                               "val_macro_auroc": round(mv["macro_auroc"], 4), "val_ece": round(mv["ece"], 4),
                               "offset": off.round(2).tolist(), "temperature": round(float(t), 3),
                               "relative_change_of_w": round(float(np.linalg.norm(w - w0) / np.linalg.norm(w0)), 3),
                               "_head": (w, bias + off, t)})
    best = max(candidates, key=lambda c: c["val_balanced_accuracy"] + c["val_macro_auroc"])
    w, bias, t = best["_head"]
    keys = ("macro_auroc", "macro_auroc_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
            "sensitivity_malignant", "ece", "confusion_matrix")
    refit = classification_metrics(y[te], softmax((f[te] @ w.T + bias) / t), labels, n_boot=1000)
    shipped = classification_metrics(y[te], softmax((f[te] @ w0.T + b0) / b.temperature), labels, n_boot=1000)
    res = {"bundle": b.name, "version": b.version, "data": os.path.basename(args.data),
           "n": {p: int((parts == p).sum()) for p in ("train", "val", "test")},
           "seconds": round(time.time() - t0, 1),
           "candidates": [{k: v for k, v in c.items() if k != "_head"} for c in candidates],
           "chosen_on_validation": {"flips": best["flips"], "lam": best["lam"]},
           "test_refit_head": {k: refit[k] for k in keys},
           "test_shipped_head": {k: shipped[k] for k in keys}}
    write_json(res, RESULTS / f"head_refit_{b.name}-{b.version}.json")
    for name in ("test_refit_head", "test_shipped_head"):
        m = res[name]
        print(f"{name}: macro AUROC {m['macro_auroc']:.3f}, balanced accuracy "
              f"{m['balanced_accuracy']:.3f}, malignant sensitivity {m['sensitivity_malignant']:.3f}, "
              f"ECE {m['ece']:.3f}")
    return res


if __name__ == "__main__":
    main()
