"""Out-of-distribution (OOD) score per slice and per volume, from the pooled layer4 features
that the forward pass already returns (``SlicePredictions.features``).

Method ``mahalanobis-ppca``: the Mahalanobis distance of a slice's pooled layer4 vector
(2048 values, global average pool) to the nearest class mean, under one covariance shared
by the classes (fitted on within-class deviations of training features) and modelled as a
probabilistic PCA: the top ``n_components`` principal directions keep their own variances,
the rest of the space gets one residual variance. So the score is the Mahalanobis distance
in the PCA subspace plus the part of the vector outside that subspace, which is where noise
and unfamiliar images tend to land:

    score(x)^2 = min_k  sum_i (u_i . (x - m_k))^2 / lambda_i  +  |residual_k|^2 / sigma^2

A slice is out of distribution when its score is above ``slice_threshold``: the
``quantile`` (default 0.95) of the scores of validation features, so at most about 5 % of
in-distribution validation slices are refused by construction (``validation`` records the
measured rate). A volume is out of distribution when more than ``volume_fraction`` (half)
of its analysed slices are. Cost: one (n, 2048) x (2048, d + K) product per volume.

A bundle stores the model as ``models/ood.safetensors`` (arrays only) plus an ``"ood"``
entry in ``configs/metadata.json`` (see :func:`save_ood`); bundles without one still work,
and the check then says "not available".

Example::

    >>> from dicompipe.model.ood import fit_ood, save_ood
    >>> ood = fit_ood(train_feats, train_y, val_features=val_feats, n_components=32)
    >>> ood.validation["false_refusal_rate"]            # <= 0.05 by construction
    >>> save_ood("runs/lung-bundle", ood, fitted_on="iq-othnccd train (fit) + val (threshold)")
    >>> check(load_bundle("runs/lung-bundle").ood(), preds.features).out_of_distribution
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicompipe.errors import ModelError
from dicompipe.types import OodCheck

METHOD = "mahalanobis-ppca"
SCHEMA = "dicompipe-ood/1"
OOD_FILE = "models/ood.safetensors"
METADATA_FILE = "configs/metadata.json"
NOT_AVAILABLE = "not available: the bundle has no OOD model"
ARRAYS = ("class_means", "components", "variances", "residual_variance")


def pooled(features) -> np.ndarray:
    """(n, C, h, w) layer4 activations -> (n, C) global average pool; (n, C) passes through.

    >>> pooled(np.ones((2, 2048, 7, 7))).shape
    (2, 2048)
    """
    f = np.asarray(features)
    if f.ndim == 4:
        f = f.reshape(f.shape[0], f.shape[1], -1).mean(-1)
    if f.ndim != 2:
        raise ModelError(f"OOD features must be (n, C) or (n, C, h, w), got shape {f.shape}.")
    return f.astype(np.float64, copy=False)


@dataclass
class OodModel:
    """A fitted OOD scorer (see the module doc). Arrays are float32, as stored.

    >>> m.score(preds.features)            # (n,) one score per slice
    >>> m.check(preds.features).out_rows   # rows above m.slice_threshold
    """

    class_means: np.ndarray               # (K, C)
    components: np.ndarray                # (d, C) orthonormal rows
    variances: np.ndarray                 # (d,) variance along each component
    residual_variance: float              # variance per dimension outside the subspace
    slice_threshold: float = float("inf")
    quantile: float = 0.95
    volume_fraction: float = 0.5
    validation: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def volume_rule(self) -> str:
        return (f"out of distribution when more than {100 * self.volume_fraction:g} % of the "
                "analysed slices are")

    def score(self, features) -> np.ndarray:
        """OOD score per slice (higher = less like the training data)."""
        x = pooled(features)
        if x.shape[1] != self.class_means.shape[1]:
            raise ModelError(f"OOD model expects {self.class_means.shape[1]} features per "
                             f"slice, got {x.shape[1]}.")
        m = self.class_means.astype(np.float64)
        u = self.components.astype(np.float64)
        d = len(u)
        # einsum without optimize runs in this thread: for products this small BLAS's thread
        # pool costs ~20x more CPU on a busy machine (its threads spin while waiting)
        prod = np.einsum("nc,jc->nj", x, np.concatenate([u, m]), optimize=False)
        xp, xm = prod[:, :d], prod[:, d:]                                  # (n, d), (n, K)
        mp = np.einsum("kc,dc->kd", m, u, optimize=False)                  # (K, d)
        sq = (x * x).sum(1)[:, None] - 2 * xm + (m * m).sum(1)[None]       # |x - m_k|^2
        best = None
        for k in range(len(m)):
            proj = xp - mp[k]
            inside = (proj * proj).sum(1)
            d2 = ((proj * proj) / self.variances.astype(np.float64)).sum(1)
            d2 += np.maximum(sq[:, k] - inside, 0.0) / float(self.residual_variance)
            best = d2 if best is None else np.minimum(best, d2)
        return np.sqrt(best)

    def check(self, features) -> OodCheck:
        """Scores, the slices above the threshold and the volume rule's decision."""
        s = self.score(features)
        out = [int(i) for i in np.flatnonzero(s > self.slice_threshold)]
        return OodCheck(available=True, method=METHOD, scores=[float(v) for v in s],
                        slice_threshold=float(self.slice_threshold), out_rows=out,
                        volume_rule=self.volume_rule,
                        out_of_distribution=len(s) > 0 and len(out) > self.volume_fraction * len(s))


def check(model: OodModel | None, features) -> OodCheck:
    """:meth:`OodModel.check`, or "not available" without a model or features.

    >>> check(None, feats).note
    'not available: the bundle has no OOD model'
    """
    if model is None:
        return OodCheck(available=False, note=NOT_AVAILABLE)
    if features is None:
        return OodCheck(available=False, method=METHOD,
                        note="not available: the inference backend returned no layer4 features")
    return model.check(features)


def fit_ood(features, labels, *, n_components: int = 32, quantile: float = 0.95,
            val_features=None, val_fraction: float = 0.2, volume_fraction: float = 0.5,
            seed: int = 0) -> OodModel:
    """Fit the OOD scorer on training features; threshold = ``quantile`` of validation scores.

    ``features``: (n, 2048) pooled layer4 vectors (or (n, 2048, h, w) activations);
    ``labels``: (n,) class of each (names or indices). ``val_features``: in-distribution
    validation features for the threshold (recommended: the bundle's validation part,
    rendered the way inference renders it); without them a seeded ``val_fraction`` of
    ``features`` is held out for it. ``validation`` records n and the measured false
    refusal rate (fraction of validation slices above the threshold).

    >>> m = fit_ood(train_f, train_y, val_features=val_f, n_components=32)
    >>> m.slice_threshold, m.validation
    """
    x = pooled(features)
    y = np.asarray(labels)
    if len(x) != len(y):
        raise ModelError(f"fit_ood: {len(x)} feature rows but {len(y)} labels.")
    if not 0.5 <= quantile < 1.0:
        raise ModelError(f"fit_ood: quantile must be in [0.5, 1), got {quantile}.")
    if val_features is None:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        n_val = max(1, int(round(val_fraction * len(x))))
        val, fit = order[:n_val], order[n_val:]
        xv, x, y = x[val], x[fit], y[fit]
        source = f"held-out {100 * val_fraction:g} % of the fit features (seed {seed})"
    else:
        xv = pooled(val_features)
        source = "validation features"
    classes = list(dict.fromkeys(y.tolist()))
    idx = np.array([classes.index(v) for v in y.tolist()])
    n, c = x.shape
    if n - len(classes) < 2 or len(xv) == 0:
        raise ModelError(f"fit_ood: too few samples ({n} for {len(classes)} classes, "
                         f"{len(xv)} for the threshold).")
    means = np.stack([x[idx == k].mean(0) for k in range(len(classes))])
    r = x - means[idx]
    d = int(max(1, min(n_components, n - len(classes) - 1, c - 1)))
    _, sv, vt = np.linalg.svd(r, full_matrices=False)
    dof = n - len(classes)
    lam = sv[:d] ** 2 / dof
    total = float((r * r).sum() / dof)
    tiny = 1e-6 * total / c + 1e-12
    resid = max((total - float(lam.sum())) / (c - d), tiny)
    model = OodModel(class_means=means.astype(np.float32), components=vt[:d].astype(np.float32),
                     variances=np.maximum(lam, tiny).astype(np.float32),
                     residual_variance=float(np.float32(resid)), quantile=float(quantile),
                     volume_fraction=float(volume_fraction), labels=[str(v) for v in classes])
    sv_ = model.score(xv)
    model.slice_threshold = float(np.quantile(sv_, quantile))
    model.validation = {"n": int(len(sv_)), "on": source,
                        "false_refusal_rate": float(np.mean(sv_ > model.slice_threshold))}
    return model


# --------------------------------------------------------------------------- bundle files
def save_ood(bundle_path, ood_model: OodModel, fitted_on: str) -> Path:
    """Add (or replace) the OOD model of a bundle: ``models/ood.safetensors`` + metadata "ood".

    The metadata entry records method, file, sha256, n_components, quantile,
    slice_threshold, volume_rule, volume_out_fraction, validation, labels and ``fitted_on``
    (say what data and how it was rendered). The weights and their sha256 are untouched.

    >>> save_ood("runs/lung-bundle", m, fitted_on="iq-othnccd train (fit) + val (threshold), 8-bit slices")
    """
    from safetensors.numpy import save_file

    root = Path(bundle_path)
    mfile = root / METADATA_FILE
    try:
        md = json.loads(mfile.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"save_ood: cannot read bundle metadata {mfile}: {e}.") from e
    f = root / OOD_FILE
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    arrays = {"class_means": ood_model.class_means, "components": ood_model.components,
              "variances": ood_model.variances,
              "residual_variance": np.array([ood_model.residual_variance])}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, str(tmp),
              metadata={"format": "np", "schema": SCHEMA})
    tmp.replace(f)
    f.chmod(0o644)
    md["ood"] = {
        "method": METHOD, "file": OOD_FILE, "sha256": file_sha256(f),
        "n_components": ood_model.n_components, "quantile": ood_model.quantile,
        "slice_threshold": ood_model.slice_threshold,
        "volume_rule": ood_model.volume_rule, "volume_out_fraction": ood_model.volume_fraction,
        "feature": "layer4 global average pool",
        "validation": ood_model.validation, "labels": list(ood_model.labels),
        "fitted_on": str(fitted_on)}
    tmp_md = mfile.with_suffix(".tmp")
    tmp_md.write_text(json.dumps(md, indent=2) + "\n")
    tmp_md.replace(mfile)
    return f


def load_ood(bundle_path, entry: dict, *, verify: bool = True) -> OodModel:
    """The OOD model a bundle's metadata ``entry`` describes (safetensors only, sha256-checked).

    >>> load_ood(bundle.path, bundle.metadata["ood"])
    """
    from safetensors.numpy import load_file

    if entry.get("method") != METHOD:
        raise ModelError(f"Bundle {bundle_path}: unknown OOD method {entry.get('method')!r} "
                         f"(this dicompipe knows {METHOD!r}).")
    f = Path(bundle_path) / entry.get("file", OOD_FILE)
    if f.suffix != ".safetensors":
        raise ModelError(f"OOD model {f}: only .safetensors files are read.")
    if not f.is_file():
        raise ModelError(f"Bundle {bundle_path}: OOD model file {f} is missing.")
    if verify and file_sha256(f) != entry.get("sha256"):
        raise ModelError(f"OOD model {f} does not match the sha256 in the bundle metadata: the "
                         "file is corrupt or was replaced. Restore it or re-run save_ood.")
    try:
        a = load_file(str(f))
    except Exception as e:  # noqa: BLE001 - safetensors errors are untyped
        raise ModelError(f"Cannot read the OOD model {f}: {e}.") from e
    missing = [k for k in ARRAYS if k not in a]
    if missing:
        raise ModelError(f"OOD model {f} lacks {', '.join(missing)}.")
    m, u, v = a["class_means"], a["components"], a["variances"]
    if m.ndim != 2 or u.ndim != 2 or u.shape[1] != m.shape[1] or v.shape != (u.shape[0],):
        raise ModelError(f"OOD model {f}: inconsistent shapes {m.shape}, {u.shape}, {v.shape}.")
    return OodModel(class_means=m, components=u, variances=v,
                    residual_variance=float(a["residual_variance"].ravel()[0]),
                    slice_threshold=float(entry["slice_threshold"]),
                    quantile=float(entry.get("quantile", 0.95)),
                    volume_fraction=float(entry.get("volume_out_fraction", 0.5)),
                    validation=dict(entry.get("validation") or {}),
                    labels=list(entry.get("labels") or []))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
