"""Classification metrics with numpy only: AUROC, sensitivity/specificity, balanced accuracy,
ECE, bootstrap intervals.

Example::

    >>> m = classification_metrics(y, probs, labels, n_boot=1000)
    >>> m["macro_auroc"], m["macro_auroc_ci95"]
"""
from __future__ import annotations

import numpy as np


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC (Mann-Whitney, ties counted half). NaN when one class is absent."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, float)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):          # average ranks of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def roc_curve(y, score):
    """(fpr, tpr) points for a binary problem."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(score, float), kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(y[order])])
    fp = np.concatenate([[0], np.cumsum(~y[order])])
    return fp / max(1, (~y).sum()), tp / max(1, y.sum())


def macro_auroc(y, probs) -> float:
    """Mean one-vs-rest AUROC over classes (binary: AUROC of the positive class); classes
    absent from ``y`` (or alone in it) are left out, NaN when none is left."""
    probs = np.asarray(probs)
    if probs.shape[1] == 2:
        return auroc(np.asarray(y) == 1, probs[:, 1])
    vals = [v for k in range(probs.shape[1]) if not np.isnan(v := auroc(np.asarray(y) == k, probs[:, k]))]
    return float(np.mean(vals)) if vals else float("nan")


def confusion(y, pred, k: int) -> np.ndarray:
    """Rows: true class, columns: predicted."""
    m = np.zeros((k, k), int)
    np.add.at(m, (np.asarray(y), np.asarray(pred)), 1)
    return m


def ece(y, probs, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    probs = np.asarray(probs)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == np.asarray(y)
    edges = np.linspace(0, 1, bins + 1)
    e = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            e += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(e)


def ece_noise_floor(probs, bins: int = 15, draws: int = 1000, seed: int = 0) -> dict:
    """The ECE a perfectly calibrated model with these confidences would still show on this
    many cases: labels drawn from ``probs`` themselves, median and 95th percentile over
    ``draws``. An ECE target below the median cannot be told apart from chance at this n.

    >>> ece_noise_floor(np.full((200, 2), 0.5))["median"] > 0
    True
    """
    probs = np.asarray(probs, float)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, 1)
    vals = [ece((rng.random((len(probs), 1)) > cum).sum(1).clip(0, probs.shape[1] - 1), probs, bins)
            for _ in range(draws)]
    return {"median": float(np.median(vals)), "p95": float(np.percentile(vals, 95)), "draws": draws}


def reliability(y, probs, bins: int = 10):
    """(bin centres, accuracy, confidence, counts) for a reliability diagram."""
    probs = np.asarray(probs)
    conf, correct = probs.max(1), probs.argmax(1) == np.asarray(y)
    edges = np.linspace(0, 1, bins + 1)
    acc, cf, cnt = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        cnt.append(int(m.sum()))
        acc.append(float(correct[m].mean()) if m.any() else np.nan)
        cf.append(float(conf[m].mean()) if m.any() else np.nan)
    return (edges[:-1] + edges[1:]) / 2, np.array(acc), np.array(cf), np.array(cnt)


def _point(y, probs, labels):
    k = len(labels)
    pred = probs.argmax(1)
    cm = confusion(y, pred, k)
    sens = [cm[i, i] / cm[i].sum() if cm[i].sum() else np.nan for i in range(k)]
    spec = []
    for i in range(k):
        neg = cm.sum() - cm[i].sum()
        spec.append((neg - (cm[:, i].sum() - cm[i, i])) / neg if neg else np.nan)
    return {"macro_auroc": macro_auroc(y, probs),
            "balanced_accuracy": float(np.nanmean(sens)),
            "accuracy": float((pred == y).mean()),
            **{f"sensitivity_{l}": float(s) for l, s in zip(labels, sens)},
            **{f"specificity_{l}": float(s) for l, s in zip(labels, spec)},
            **({f"auroc_{l}": auroc(y == i, probs[:, i]) for i, l in enumerate(labels)}
               if k > 2 else {})}, cm


def classification_metrics(y, probs, labels, n_boot: int = 1000, seed: int = 0,
                           groups=None, probs_uncal=None) -> dict:
    """Point metrics plus bootstrap 95% intervals (percentile).

    ``groups`` (optional): resample whole groups (e.g. content groups / file-number blocks)
    instead of single slices, so correlated slices do not narrow the interval.
    ``probs_uncal``: the uncalibrated probabilities, for ECE before calibration.
    """
    y = np.asarray(y)
    probs = np.asarray(probs, float)
    point, cm = _point(y, probs, labels)
    point["ece"] = ece(y, probs)
    if probs_uncal is not None:
        point["ece_uncalibrated"] = ece(y, np.asarray(probs_uncal))
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(len(y))]
    else:
        g = np.asarray(groups)
        units = [np.nonzero(g == u)[0] for u in np.unique(g)]
    boots: dict[str, list] = {}
    for _ in range(n_boot):
        pick = rng.integers(0, len(units), len(units))
        idx = np.concatenate([units[i] for i in pick])
        if len(np.unique(y[idx])) < len(labels):
            continue
        b, _ = _point(y[idx], probs[idx], labels)
        b["ece"] = ece(y[idx], probs[idx])
        for key, v in b.items():
            boots.setdefault(key, []).append(v)
    out = {"n": int(len(y)), "n_per_class": {l: int((y == i).sum()) for i, l in enumerate(labels)},
           "confusion_matrix": cm.tolist(), "bootstrap": {"n": n_boot, "unit":
                                                           "slice" if groups is None else "group"}}
    for key, v in point.items():
        out[key] = v
        if key in boots:
            arr = np.array(boots[key], float)
            arr = arr[~np.isnan(arr)]
            if len(arr):
                out[key + "_ci95"] = [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))]
    out["ece_noise_floor"] = ece_noise_floor(probs, draws=200, seed=seed)
    return out
