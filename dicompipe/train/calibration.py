"""Temperature scaling (Guo et al. 2017) fitted on validation logits, and the calibration
entry of a bundle's metadata (ECE per input kind).

Example::

    >>> T = fit_temperature(val_logits, val_y)      # float > 0
    >>> probs = softmax(test_logits / T, np.float64)
"""
from __future__ import annotations

import numpy as np

from dicompipe.model.calibration import INPUT_KINDS
from dicompipe.train.metrics import ece as _ece
from dicompipe.types import softmax


def nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    p = softmax(np.asarray(logits) / t, np.float64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), np.asarray(y)], 1e-12, 1))))


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T minimising validation NLL (log-space grid, then golden-section refinement)."""
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), 200))
    vals = [nll(logits, y, t) for t in grid]
    i = int(np.argmin(vals))
    a, b = np.log(grid[max(0, i - 1)]), np.log(grid[min(len(grid) - 1, i + 1)])
    g = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        c, d = b - g * (b - a), a + g * (b - a)
        if nll(logits, y, np.exp(c)) < nll(logits, y, np.exp(d)):
            b = d
        else:
            a = c
    return float(np.exp((a + b) / 2))


def calibrate(logits: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    """(temperature, method text). When every validation slice is already classified
    correctly the NLL keeps falling as T -> 0, so T is not identifiable: keep T = 1."""
    logits, y = np.asarray(logits), np.asarray(y)
    if len(y) == 0:
        return 1.0, "none (no validation data)"
    if (logits.argmax(1) == y).all():
        return 1.0, ("none: the validation part is perfectly separated, so the temperature is "
                     "not identifiable (NLL falls as T -> 0); T = 1 kept")
    return fit_temperature(logits, y), "temperature scaling on the validation part (NLL)"


def ece_by_kind(data: dict, temperature: float, bins: int = 15) -> dict:
    """ECE of ``softmax(logits / T)`` per input kind, where data allow.

    ``data``: kind -> (logits, y) of validation slices rendered the way inference renders
    that kind, or None / empty when there are none. Every kind in :data:`INPUT_KINDS`
    gets an entry: a float, or "not measured: no validation data of this kind".

    >>> ece_by_kind({"8-bit slices": (val_logits, val_y), "HU DICOM": None}, T)
    {'8-bit slices': 0.041, 'HU DICOM': 'not measured: no validation data of this kind'}
    """
    out = {}
    for kind in dict.fromkeys([*INPUT_KINDS, *data]):
        d = data.get(kind)
        if d is None or len(d[1]) == 0:
            out[kind] = "not measured: no validation data of this kind"
        else:
            out[kind] = _ece(np.asarray(d[1]), softmax(np.asarray(d[0]) / temperature, np.float64), bins)
    return out


def calibration_entry(temperature: float, method: str, *, fitted_on: str,
                      ece: dict | None = None) -> dict:
    """``metadata["calibration"]``: temperature, method, what it was fitted on, ECE per kind.

    ``ece``: kind -> float or a "not measured: why" text (see :func:`ece_by_kind`); kinds
    left out are recorded as "not measured".

    >>> calibration_entry(1.7, "temperature scaling on the validation part (NLL)",
    ...                   fitted_on="iq-othnccd validation part, 8-bit JPG slices",
    ...                   ece={"8-bit slices": 0.04})
    {'temperature': 1.7, 'method': '...', 'fitted_on': '...',
     'ece': {'8-bit slices': 0.04, 'HU DICOM': 'not measured'}}
    """
    ece = dict(ece or {})
    return {"temperature": float(temperature), "method": str(method),
            "fitted_on": str(fitted_on),
            "ece": {k: (float(v) if isinstance(v, (int, float)) else (v or "not measured"))
                    for k, v in {**{k: ece.get(k) for k in INPUT_KINDS}, **ece}.items()}}
