"""Bilinear resizing of image stacks in numpy, the same numbers as torch's
``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``.

Each axis is one sparse weight matrix: the triangle filter of torch's (and Pillow's)
antialiased resampling, widened by the scale factor when shrinking, plain bilinear with
half-pixel centres when enlarging. Rendering, Grad-CAM upsampling and mapping maps back to
the CT all use it, so the ONNX Runtime / OpenVINO path never imports torch (about 2 s of
start-up) and training (which renders through the same code) sees the same pixels.

Example::

    >>> resize(np.ones((3, 512, 512), np.float32), (224, 224)).shape
    (3, 224, 224)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import sparse


@lru_cache(maxsize=64)
def axis_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """(n_out, n_in) weights of one axis; rows sum to 1.

    >>> axis_weights(4, 2).toarray().round(3)       # shrinking: a triangle twice as wide
    array([[0.429, 0.429, 0.143, 0.   ],
           [0.   , 0.143, 0.429, 0.429]], dtype=float32)
    """
    scale = n_in / n_out
    support, inv = (scale, 1.0 / scale) if scale > 1.0 else (1.0, 1.0)
    centre = scale * (np.arange(n_out) + 0.5)
    # torch truncates toward zero (a C cast), then clamps, exactly like this
    lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), n_in)
    width = int((hi - lo).max())
    j = lo[:, None] + np.arange(width)[None]                      # (n_out, width)
    w = np.maximum(0.0, 1.0 - np.abs((j - centre[:, None] + 0.5) * inv))
    w[j >= hi[:, None]] = 0.0
    w /= w.sum(1, keepdims=True)
    rows = np.repeat(np.arange(n_out), width)
    keep = w.ravel() > 0
    return sparse.csr_matrix((w.ravel()[keep].astype(np.float32), (rows[keep], np.minimum(j, n_in - 1).ravel()[keep])),
                             shape=(n_out, n_in))


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``x`` (..., h, w) to ``size`` (H, W); float32 out."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[-2:]
    hh, ww = size
    if (h, w) == (hh, ww):
        return x.copy()
    lead = x.shape[:-2]
    flat = x.reshape(-1, h, w)
    if ww != w:                                   # rows: (n*h, w) @ (w, W)
        flat = (axis_weights(w, ww) @ flat.reshape(-1, w).T).T.reshape(-1, h, ww)
    if hh != h:                                   # columns: (H, h) @ (h, n*W)
        n = flat.shape[0]
        cols = np.ascontiguousarray(flat.transpose(1, 0, 2)).reshape(h, -1)
        flat = (axis_weights(h, hh) @ cols).reshape(hh, n, ww).transpose(1, 0, 2)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(lead + (hh, ww))
