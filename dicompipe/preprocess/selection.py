"""Slice selection: skip grid slices that cannot show the organ, each with its reason.

Rules come from the organ registry (``slice_selection`` in ``configs/<organ>.yaml``, see
:mod:`dicompipe.organs`); a rule applies when it is set (lung: ``min_lung_fraction``;
pancreas: ``max_lung_fraction``, ``min_soft_tissue_fraction``). HU thresholds only make sense
for HU input, so already-windowed PNG/JPG input only has blank slices skipped.

Example::

    >>> reasons = skip_reasons(grid_hu, "lung", {"body_hu": -500, "min_body_fraction": 0.05,
    ...                        "lung_air_hu": [-950, -400], "min_lung_fraction": 0.02})
    >>> reasons[0]         # None (kept) or "too little body: 1% of the slice < 5%"
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicompipe import organs


def _body(slice_hu: np.ndarray, body_hu: float) -> np.ndarray:
    """Body mask: tissue above ``body_hu`` with enclosed air (lungs, bowel gas) filled in."""
    return fill_holes(slice_hu > body_hu)


_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)``, the same pixels ~4x faster: the background's
    4-connected pieces that touch the border are outside; every other piece is a hole. A
    (z, y, x) stack is filled slice by slice, in one pass.

    >>> fill_holes(np.pad(np.pad(np.zeros((1, 1), bool), 1, constant_values=True), 1)).sum()
    np.int64(9)
    """
    stack = mask.ndim == 3
    lab, n = ndimage.label(~mask, structure=_IN_PLANE if stack else None)
    outside = np.zeros(n + 1, bool)
    edges = (lab[..., 0, :], lab[..., -1, :], lab[..., :, 0], lab[..., :, -1])
    outside[np.concatenate([e.ravel() for e in edges])] = True
    outside[0] = False                       # label 0: the mask itself
    return ~outside[lab]


def lung_fractions(hu: np.ndarray, max_slices: int = 32, body_hu: float = -500,
                   lung_air_hu=(-950, -400)) -> np.ndarray:
    """Lung-air fraction of the (hole-filled) body area on up to ``max_slices`` evenly spaced
    slices of a (z, y, x) HU array — about 0.3-0.5 in a chest, under 0.05 in an abdomen.

    >>> float(np.median(lung_fractions(volume.array)))
    """
    zs = np.unique(np.linspace(0, hu.shape[0] - 1, min(max_slices, hu.shape[0])).round().astype(int))
    step = 2 if min(hu.shape[1:]) >= 128 else 1
    out = []
    for z in zs:
        s = np.asarray(hu[z, ::step, ::step], np.float32)
        body = _body(s, body_hu)
        lung = body & (s > lung_air_hu[0]) & (s < lung_air_hu[1])
        out.append(float(lung.sum()) / max(1, int(body.sum())))
    return np.asarray(out)


def skip_reasons(grid: np.ndarray, organ: str | None, selection: dict | None = None,
                 windowed: bool = False) -> list[str | None]:
    """One entry per slice of ``grid`` (z, y, x): None to keep it, else why it is skipped."""
    n = grid.shape[0]
    if windowed:
        # 8-bit display values: no HU rules; only blank (constant) slices are skipped
        return [None if float(np.ptp(grid[z])) > 1.0 else "blank slice (constant intensity)"
                for z in range(n)]
    known = organs.find(organ)
    if known is None:
        return [None] * n
    cfg = {**known.selection.rules(), **{k: v for k, v in (selection or {}).items() if v is not None}}
    # rules are area fractions: a 2x-subsampled slice gives the same answer much faster
    step = 2 if min(grid.shape[1:]) >= 128 else 1
    out: list[str | None] = []
    for z in range(n):
        s = np.asarray(grid[z, ::step, ::step], np.float32)
        area = s.size
        body = _body(s, cfg["body_hu"])
        nb = int(body.sum())
        if nb < cfg["min_body_fraction"] * area:
            out.append(f"too little body: {100 * nb / area:.0f}% of the slice "
                       f"< {100 * cfg['min_body_fraction']:.0f}% (HU > {cfg['body_hu']})")
            continue
        lo, hi = cfg["lung_air_hu"]
        lung = float((body & (s > lo) & (s < hi)).sum()) / nb
        if cfg.get("min_lung_fraction") is not None and lung < cfg["min_lung_fraction"]:
            out.append(f"no lung: lung-air ({lo}..{hi} HU) {100 * lung:.1f}% of the body "
                       f"< {100 * cfg['min_lung_fraction']:.0f}%")
            continue
        if cfg.get("max_lung_fraction") is not None and lung > cfg["max_lung_fraction"]:
            out.append(f"above the abdomen: lung-air {100 * lung:.0f}% of the body "
                       f"> {100 * cfg['max_lung_fraction']:.0f}%")
            continue
        if cfg.get("min_soft_tissue_fraction") is not None:
            tlo, thi = cfg["soft_tissue_hu"]
            soft = float((body & (s >= tlo) & (s <= thi)).sum()) / nb
            if soft < cfg["min_soft_tissue_fraction"]:
                out.append(f"outside the abdomen: soft tissue ({tlo}..{thi} HU) {100 * soft:.0f}% "
                           f"of the body < {100 * cfg['min_soft_tissue_fraction']:.0f}%")
                continue
        out.append(None)
    return out
