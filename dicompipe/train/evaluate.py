"""``dicompipe evaluate DATA --model BUNDLE --out DIR``: honest evaluation of a bundle.

Rebuilds the bundle's leak-free split of DATA (same code and seed as training; checked
against the split stored in the bundle's docs/split.json when it is there), runs the
network on the test part with the bundle's preprocessing, applies the bundle's temperature,
and writes ``metrics.json`` plus ``confusion_matrix.png``, ``roc.png`` and
``reliability.png``. For comparison:

- ``naive_split``: a random per-slice split of the same images. A 1-nearest-neighbour
  classifier on 32x32 thumbnails (no training at all) is scored on the leak-free and on the
  naive split: the gap is what leakage alone buys. The network's own scores on the naive
  test part are reported too, flagged: that part contains slices the network was trained on.
- ``subset_512``: lung test slices that are exactly 512x512 (controls the image-size shortcut).

Example::

    dicompipe evaluate IQ-OTH_NCCD/ --model lung-resnet50 --out eval/lung
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dicompipe.train import splits as S
from dicompipe.train.metrics import classification_metrics, reliability, roc_curve
from dicompipe.types import softmax


def _figures(out: Path, y, probs, probs_uncal, labels, title: str, prefix: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dicompipe.train.metrics import confusion
    k = len(labels)
    cm = confusion(y, probs.argmax(1), k)
    fig, ax = plt.subplots(figsize=(4 + k * 0.4, 3.6 + k * 0.3))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}confusion_matrix.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4))
    cls = range(1, 2) if k == 2 else range(k)
    for i in cls:
        fpr, tpr = roc_curve(y == i, probs[:, i])
        ax.plot(fpr, tpr, label=labels[i])
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}roc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4))
    for p, name, st in ((probs_uncal, "uncalibrated", "o--"), (probs, "temperature-scaled", "s-")):
        c, acc, conf, cnt = reliability(y, p)
        m = cnt > 0
        ax.plot(conf[m], acc[m], st, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}reliability.png", dpi=110)
    plt.close(fig)


def knn_probe(images, y, parts, size: int = 32) -> dict:
    """1-NN (cosine on size x size thumbnails) trained on "train", scored on "test"."""
    import torch
    import torch.nn.functional as F

    from dicompipe.train.metrics import confusion
    t = torch.from_numpy(images.astype(np.float32))[:, None]
    v = F.interpolate(t, size=(size, size), mode="area")[:, 0].reshape(len(images), -1).numpy()
    v = v - v.mean(1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-6
    tr = np.array([p == "train" for p in parts])
    te = np.array([p == "test" for p in parts])
    nn = (v[te] @ v[tr].T).argmax(1)
    pred = y[tr][nn]
    k = int(y.max()) + 1
    cm = confusion(y[te], pred, k)
    sens = [cm[i, i] / cm[i].sum() for i in range(k) if cm[i].sum()]
    return {"accuracy": float((pred == y[te]).mean()), "balanced_accuracy": float(np.mean(sens)),
            "n_test": int(te.sum())}


def _short(m: dict) -> dict:
    keys = ["n", "macro_auroc", "macro_auroc_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
            "ece", "ece_ci95", "ece_uncalibrated", "ece_noise_floor"]
    keys += [k for k in m if k.startswith(("sensitivity_", "specificity_", "auroc_"))]
    return {k: m[k] for k in keys if k in m}


def _metrics_or_empty(y, pc, pu, labels, n_boot):
    if len(y) == 0 or len(np.unique(y)) < 2:
        return {"n": int(len(y)), "note": "too few images or classes in this subset"}
    return classification_metrics(y, pc, labels, n_boot=n_boot, probs_uncal=pu)


def evaluate(data, bundle, out, label_map=None, n_boot: int = 1000, workdir="training",
             log=print) -> dict:
    """Evaluate a loaded-or-named bundle on DATA; writes files under ``out``; returns metrics."""
    import torch

    from dicompipe.model.bundle import load_bundle
    from dicompipe.train.data import parse_label_map
    from dicompipe.train.train import load_data, make_split, predict_logits
    from dicompipe.types import PreprocessSpec

    b = load_bundle(bundle) if isinstance(bundle, (str, Path)) else bundle
    md = b.metadata
    organ, labels = md["organ"], list(md["labels"])
    spec = PreprocessSpec.from_dict(md["preprocessing"])
    T = float(md.get("calibration", {}).get("temperature", 1.0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = parse_label_map(label_map) if isinstance(label_map, (str, type(None))) else label_map
    items, lab_names, images, spec = load_data(data, organ, lm, spec=spec, workdir=workdir, log=log)
    if lab_names != labels:
        raise ValueError(f"data labels {lab_names} != bundle labels {labels}")
    y = np.array([it.label for it in items])
    seed = int(md.get("training", {}).get("split", {}).get("seed", 0))
    fr = tuple(md.get("training", {}).get("split", {}).get("fractions", (0.65, 0.15, 0.20)))
    parts, info = make_split(organ, items, images, seed, fr)
    stored = Path(b.path) / "docs" / "split.json"
    split_check = "no stored split"
    if stored.exists():
        import os
        sp = json.loads(stored.read_text())["parts"]
        mine = {os.path.relpath(it.path, data): p for it, p in zip(items, parts)}
        common = set(sp) & set(mine)
        same = sum(sp[k] == mine[k] for k in common)
        split_check = f"{same}/{len(common)} items in the same part as the stored training split"
        if common and same != len(common):
            log("WARNING: split differs from the bundle's stored split; using the stored one")
            parts = [sp.get(os.path.relpath(it.path, data)) for it in items]
    te = np.array([p == "test" for p in parts])
    kept = np.array([p is not None for p in parts])
    naive = [None] * len(items)
    idx = np.nonzero(kept)[0]
    for j, p in zip(idx, S.naive_split(y[idx], fr, seed)):
        naive[j] = p
    nte = np.array([p == "test" for p in naive])
    need = te | nte                                      # only these go through the network
    torch.set_num_threads(2)
    net = b.network()
    t0 = time.time()
    logits = np.zeros((len(items), len(labels)))
    logits[need] = predict_logits(net, images[need], spec)
    secs = time.time() - t0
    pu, pc = softmax(logits, np.float64), softmax(logits / T, np.float64)
    res = {"bundle": md["name"], "version": md.get("version"), "data": Path(data).name,
           "temperature": T, "split": info, "split_check": split_check,
           "inference_seconds": round(secs, 1), "inference_images": int(need.sum()),
           "counts": S.summary(parts, y, labels)}
    res["leak_free_test"] = classification_metrics(y[te], pc[te], labels, n_boot=n_boot,
                                                   probs_uncal=pu[te])
    _figures(out, y[te], pc[te], pu[te], labels, f"{md['name']} leak-free test (n={te.sum()})")
    if organ == "lung":
        sq = np.array([tuple(it.shape[:2]) == (512, 512) for it in items])
        m = te & sq
        res["subset_512_test"] = _metrics_or_empty(y[m], pc[m], pu[m], labels, n_boot)
    # the naive comparison
    seen = np.array([p in ("train", "val") for p in parts])
    res["naive_split"] = {
        "knn_probe_leak_free": knn_probe(images, y, parts),
        "knn_probe_naive": knn_probe(images, y, naive),
        "network_on_naive_test": classification_metrics(y[nte], pc[nte], labels, n_boot=n_boot,
                                                        probs_uncal=pu[nte]),
        "naive_test_fraction_seen_in_training": float(seen[nte].mean()) if nte.any() else None,
        "note": ("No network was trained on the naive split (CPU budget). The 1-NN probe needs "
                 "no training, so its gap between the two splits is what slice leakage alone "
                 "buys; the network's naive-test scores include slices it trained on."),
    }
    _figures(out, y[nte], pc[nte], pu[nte], labels, f"{md['name']} naive split test (contaminated)",
             prefix="naive_")
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    log(json.dumps({"leak_free_test": _short(res["leak_free_test"]),
                    **({"subset_512_test": _short(res["subset_512_test"])}
                       if "subset_512_test" in res else {}),
                    "knn": [res["naive_split"]["knn_probe_leak_free"],
                            res["naive_split"]["knn_probe_naive"]]}, indent=1))
    return res


# --------------------------------------------------------------------------- model card
LIMITS = {
    "lung": [
        "Training images are 8-bit JPEG exports under an unknown, contrast-stretched display "
        "window (soft tissue spread over grey 128-255, lungs black), not Hounsfield units. "
        "DICOM input is rendered with the measured window (-200, 700) HU, which reproduces the "
        "tissue levels only approximately; expect a domain shift on real HU series.",
        "Single centre (Iraq-Oncology Teaching Hospital / NCCD, one Siemens SOMATOM), 110 "
        "cases, no patient IDs: the split uses contiguous file-number blocks, so a patient "
        "straddling a block boundary can still leak a few slices.",
        "Benign has only 15 cases (120 slices): benign metrics rest on very few test patients "
        "and have wide intervals.",
        "Slice-level labels are the case label: every slice of a malignant case is 'malignant' "
        "even when the tumour is not in that slice.",
        "Trained from scratch (no ImageNet weights) for a short CPU budget.",
    ],
    "pancreas": [
        "Training images are 8-bit JPEGs of unknown provenance and window, not HU; DICOM input "
        "is rendered with the measured window (-40, 1640) HU.",
        "The Kaggle set has heavy duplication (only ~80% of training files distinct, test/ "
        "mostly copies of train/), images under both labels, web pictures among the tumour "
        "images, and file-name prefixes/sizes that correlate with the class. Duplicates and "
        "conflicting images were removed and the split is by content groups, but normal and "
        "tumour images come from different patient series: the classifier may separate "
        "sources, not disease. Near-perfect validation/test scores should be read that way.",
        "No patient IDs; content groups approximate patients.",
        "Trained from scratch (no ImageNet weights) for a short CPU budget.",
    ],
}


def _fmt(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    ci = m.get(key + "_ci95")
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def metrics_table(res: dict, labels: list[str]) -> str:
    cols = [("leak-free test", res.get("leak_free_test", {}))]
    if "subset_512_test" in res and "macro_auroc" in res["subset_512_test"]:
        cols.append(("leak-free test, 512x512 only", res["subset_512_test"]))
    cols.append(("naive random split test (contaminated)",
                 res.get("naive_split", {}).get("network_on_naive_test", {})))
    keys = ["macro_auroc", "balanced_accuracy", "ece_uncalibrated", "ece"]
    keys += [f"sensitivity_{l}" for l in labels] + [f"specificity_{l}" for l in labels]
    if len(labels) > 2:
        keys += [f"auroc_{l}" for l in labels]
    lines = ["| metric | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols),
             "| n slices | " + " | ".join(str(m.get("n", "")) for _, m in cols) + " |"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(m, k) for _, m in cols) + " |")
    lines.append("| ece a perfectly calibrated model would show at this n (median) | " + " | ".join(
        f"{m['ece_noise_floor']['median']:.3f}" if "ece_noise_floor" in m else "" for _, m in cols) + " |")
    nv = res.get("naive_split", {})
    if nv:
        a, b = nv.get("knn_probe_leak_free", {}), nv.get("knn_probe_naive", {})
        lines.append(f"| 1-NN pixel probe, balanced accuracy | {a.get('balanced_accuracy', 0):.3f} | "
                     + ("| " if len(cols) == 3 else "") + f"{b.get('balanced_accuracy', 0):.3f} |")
    return "\n".join(lines)


def write_card(bundle_dir, res: dict, extra: str = "") -> None:
    """Put test metrics into the bundle's metadata.json and write docs/README.md."""
    bundle_dir = Path(bundle_dir)
    mdf = bundle_dir / "configs" / "metadata.json"
    md = json.loads(mdf.read_text())
    short = {k: (_short(v) if isinstance(v, dict) and "n" in v else v)
             for k, v in res.items() if k in ("leak_free_test", "subset_512_test")}
    md["metrics"] = {**{k: v for k, v in md.get("metrics", {}).items()
                        if k == "validation_calibrated"},
                     **short,
                     "naive_split": {k: (_short(v) if k == "network_on_naive_test" else v)
                                     for k, v in res.get("naive_split", {}).items()},
                     "evaluated_on": res.get("data"), "split_check": res.get("split_check")}
    mdf.write_text(json.dumps(md, indent=2) + "\n")
    tr, labels = md.get("training", {}), md["labels"]
    split = tr.get("split", {})
    w = md["preprocessing"]["windows"]
    size_mb = (bundle_dir / "models" / "model.safetensors").stat().st_size / 1e6
    hist = tr.get("history", [])
    card = f"""# {md['name']} {md['version']}

**Research use only — not for clinical diagnosis or treatment decisions.**

ResNet50 (MONAI, Bottleneck [3, 4, 6, 3], 2D, stride-2 stem, {md['network']['in_channels']}
input channels) classifying single {md['organ']} CT slices into {', '.join(labels)};
positive class(es): {', '.join(md.get('positive_labels', []))}. Weights: fp16 safetensors,
{size_mb:.1f} MB, sha256 `{md['weights']['sha256'][:16]}…`.

## Data

{tr.get('citation', '')}. Read from the folder `{tr.get('data', '')}`.

Split ({split.get('method', '')}), seed {split.get('seed')}, fractions {split.get('fractions')}:
`{json.dumps(split.get('counts', {}))}`. Other facts: `{json.dumps({k: v for k, v in split.items() if k not in ('method', 'counts', 'seed', 'fractions')})}`.
The test part was not looked at before this evaluation; `docs/split.json` lists every file's part.

## Preprocessing

Rendered with `dicompipe.preprocess.render.render` (the inference renderer) in training and
inference: square padding (never stretched, so image width cannot reveal the class), resize to
{md['preprocessing']['size']}, one grey window replicated to {md['preprocessing']['channels']} channels,
`(x - {md['preprocessing']['mean']}) / {md['preprocessing']['std']}`. DICOM (HU) input uses the
window level/width {w} HU, measured so that a DICOM series renders like the training JPGs
(tissue grey levels matched on the shared LIDC-IDRI-0001 / abdomen series).

## Training

{tr.get('optimizer', '')}, batch {tr.get('batch_size')}, {tr.get('sampling', '')} sampling,
augmentation of the cached slices (rotation ±10°, scale 0.9–1.1, shift ±5 %,
{'left-right flip, ' if md['organ'] == 'lung' else ''}window width/level jitter (contrast 0.8–1.25,
brightness ±0.08), gamma 0.85–1.15, Gaussian noise, occasional blur). Schedule: {tr.get('sizes')}.
Epochs run: {tr.get('epochs')} (best by validation macro AUROC: epoch {tr.get('best_epoch')}).
Wall time {tr.get('train_seconds_total', 0) / 60:.0f} min on {tr.get('hardware', '')}
(a 2-core CPU shared with other jobs). From scratch, no pretrained weights.
Per-epoch validation: {', '.join(f"{h['epoch']}:{h['size']}px AUROC {h['val_macro_auroc']:.3f}" for h in hist)}.

## Calibration

Temperature scaling on the validation part: T = {md['calibration']['temperature']:.3f}
({md['calibration'].get('method', '')}). The volume verdict aggregates calibrated slice
probabilities ({json.dumps(md['aggregation'])}); the decision is the arg-max class, flagged
uncertain when the top probability falls in the uncertain band.

## Metrics (slice level, bootstrap 95 % intervals)

{metrics_table(res, labels)}

The naive column scores this same network on a random per-slice split's test part, which
contains slices the network was trained on ({res.get('naive_split', {}).get('naive_test_fraction_seen_in_training', 0):.0%} of it): no second
network was trained on a naive split (CPU budget). The 1-NN pixel probe needs no training:
its jump from the leak-free to the naive split is what slice leakage alone buys.
{extra}
## Intended use

{md['intended_use']} Research and demonstration of a DICOM-native pipeline. Not a medical device.

## Known limits

""" + "\n".join(f"- {x}" for x in LIMITS.get(md["organ"], [])) + "\n"
    (bundle_dir / "docs" / "README.md").write_text(card)
