"""Fit the out-of-distribution check of a bundle on its own training data and store it.

Renders the bundle's training and validation parts (its stored ``docs/split.json``) exactly
as inference renders them, takes the pooled layer4 features of the bundle's network, fits
:func:`dicompipe.model.ood.fit_ood` on the training part (threshold = ``--quantile`` of the
validation part's scores), measures the false refusals on the untouched test part and writes
the model into the bundle with :func:`dicompipe.model.ood.save_ood`.

Run: ``python -m benchmarks.fit_ood BUNDLE DATA`` (e.g. ``dicompipe/bundles/lung-resnet50
../shared/data/iq-othnccd``).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from dicompipe.model.bundle import load_bundle
from dicompipe.model.network import forward_with_features
from dicompipe.model.ood import fit_ood, save_ood
from dicompipe.train import data as D


@torch.no_grad()
def pooled_features(net, images: np.ndarray, spec, bs: int = 32) -> np.ndarray:
    out = []
    for a in range(0, len(images), bs):
        _, f = forward_with_features(net, D.to_input(torch.from_numpy(images[a:a + bs]), spec))
        out.append(f.mean((2, 3)).numpy())
    return np.concatenate(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("data")
    ap.add_argument("--workdir", default="training")
    ap.add_argument("--quantile", type=float, default=0.97,
                    help="threshold = this quantile of the validation scores (default %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    b = load_bundle(args.bundle, allow_untrained=True)
    spec = b.spec
    items, labels = D.scan(args.data, b.organ)
    parts = json.loads((Path(b.path) / "docs" / "split.json").read_text())["parts"]
    part = np.array([parts.get(os.path.relpath(it.path, args.data)) or "" for it in items])
    keep = np.isin(part, ["train", "val", "test"])
    sub = [it for it, k in zip(items, keep) if k]
    images = D.build_cache(sub, spec, Path(args.workdir) / f"cache_ood_{b.name}_{b.sha256[:8]}.npz")
    net = b.network().eval()
    feats = pooled_features(net, images, spec)
    y = np.array([it.label for it in sub])
    tr, va, te = (part[keep] == p for p in ("train", "val", "test"))
    ood = fit_ood(feats[tr], y[tr], val_features=feats[va], quantile=args.quantile)
    # the test part took no part in the fit or the threshold: its refusals are the honest rate
    ood.validation["test_n"] = int(te.sum())
    ood.validation["test_false_refusal_rate"] = float(np.mean(ood.score(feats[te]) > ood.slice_threshold))
    save_ood(b.path, ood, fitted_on=f"{Path(args.data).name}: training part (fit, {int(tr.sum())} "
                                    f"slices), validation part (threshold = {args.quantile:g} "
                                    f"quantile, {int(va.sum())} slices), test part (checked, "
                                    f"{int(te.sum())} slices), rendered as inference renders them")
    res = {"bundle": f"{b.name} {b.version}", "threshold": ood.slice_threshold, **ood.validation}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
