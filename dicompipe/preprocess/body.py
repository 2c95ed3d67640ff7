"""Input hygiene shared by training and inference: one 8-bit representation, a body mask,
a crop to the body.

- :func:`to_u8` maps HU to the bundle's 8-bit representation. ``transfer`` "window" is a
  plain display window; "floor" reproduces the IQ-OTH/NCCD export (everything below a
  floor near soft-tissue level is 0, the rest a ramp from ``low`` to 255), so a DICOM
  series and the training JPGs meet in one representation.
- :func:`body_mask`: the patient without the scanner table, blankets or outside-FOV air:
  foreground above a threshold, closed then opened (thin table lines and blankets go);
  from the largest piece, pieces (>= 1 % of it) whose centre lies near the convex hull so
  far (distance of the centre to the hull's polygon), or a quarter of which lies inside it,
  join it; the final convex hull holds lungs, fat and gaps inside. Computed on a <= 256 px
  copy: about 2.2 ms a 512² slice on a 2-core AMD EPYC (4.4 ms before 2026-12-05).
- :func:`body_box`: the bounding box of a mask with a margin; :func:`foreground_box` the
  same box straight from the thresholded slice (no full-size mask drawn).

Example::

    >>> u8 = to_u8(hu_slice, {"kind": "floor", "floor_hu": 16, "ceil_hu": 240, "low": 112})
    >>> mask = body_mask(u8)
    >>> y0, y1, x0, x1 = body_box(mask, margin=0.04)
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image, disk

MASK_THRESHOLD = 40          # 8-bit level: > 40 is body (fat in a soft-tissue window is ~38..60)
_MASK_SIDE = 256


def to_u8(hu: np.ndarray, transfer: dict | None, window: tuple[float, float] = (40.0, 400.0)) -> np.ndarray:
    """HU -> float32 in 0..255 under ``transfer`` (None or kind "window": ``window``).

    >>> to_u8(np.array([-1000., 0., 30., 500.]), {"kind": "floor", "floor_hu": 16,
    ...       "ceil_hu": 240, "low": 112}).round()
    array([  0.,   0., 121., 255.], dtype=float32)
    """
    hu = np.asarray(hu, np.float32)
    kind = (transfer or {}).get("kind", "window")
    if kind == "window":
        level, width = (transfer or {}).get("window", window)
        lo = level - width / 2.0
        return np.clip((hu - lo) * (255.0 / width), 0.0, 255.0)
    if kind == "floor":
        f, c, low = float(transfer["floor_hu"]), float(transfer["ceil_hu"]), float(transfer["low"])
        ramp = np.clip(low + (hu - f) * ((255.0 - low) / (c - f)), low, 255.0)
        return np.where(hu >= f, ramp, 0.0).astype(np.float32)
    raise ValueError(f"unknown transfer kind {kind!r}: use 'window' or 'floor'")


def body_mask(u8: np.ndarray, threshold: float = MASK_THRESHOLD, adaptive: bool = False) -> np.ndarray:
    """Boolean body mask of one 8-bit slice (y, x); all False when nothing is found.

    ``adaptive``: the foreground level is Otsu's threshold of the pixels above
    ``threshold`` when that is higher: 8-bit exports with a wide window show the air inside
    the scanner's field of view as grey (60-80 of 255 in some Kaggle slices).

    >>> m = body_mask(u8_slice)
    >>> u8_slice[~m] = 0          # table, blankets and outside air removed
    """
    a = np.asarray(u8, np.float32)
    step = _mask_step(a.shape)
    # block maximum, so thin bright structures are not lost by subsampling; without Otsu,
    # the blocks of the thresholded image (the same pixels, a quarter of the bytes)
    if adaptive:
        small = _blocks(a, step, np.maximum)
        if (small > threshold).sum() > 16:
            threshold = max(threshold, float(threshold_otsu(small[small > threshold])))
        above = small > threshold
    else:
        above = _blocks(a > threshold, step, np.logical_or)
    hull = _body_small(above)
    if step == 1:
        return hull
    out = np.zeros(a.shape, bool)
    h, w = hull.shape[0] * step, hull.shape[1] * step
    for i in range(step):
        for j in range(step):
            out[i:h:step, j:w:step] = hull
    return out


def foreground_box(above: np.ndarray, margin: float = 0.04) -> tuple[int, int, int, int] | None:
    """``body_box(body_mask(u8, threshold), margin)`` from ``above = u8 > threshold``,
    without drawing the full-size mask (the crop box of a whole series is asked before the
    model can start).

    >>> foreground_box(u8 > 40) == body_box(body_mask(u8, 40))
    True
    """
    step = _mask_step(above.shape)
    hull = _body_small(_blocks(np.asarray(above, bool), step, np.logical_or))
    ys, xs = np.nonzero(hull.any(1))[0], np.nonzero(hull.any(0))[0]
    if len(ys) == 0:
        return None
    # small pixel (r, c) is the full-size block r*step .. r*step + step - 1
    return _grown(ys[0] * step, ys[-1] * step + step - 1, xs[0] * step, xs[-1] * step + step - 1,
                  above.shape, margin)


def _mask_step(shape: tuple[int, ...]) -> int:
    return max(1, int(np.ceil(max(shape) / _MASK_SIDE)))


def _body_small(above: np.ndarray) -> np.ndarray:
    """The body mask on the (subsampled) thresholded slice: see :func:`body_mask`."""
    # closing joins the speckle of the 8-bit exports; opening drops thin table lines and blankets
    fg = close_open(above)
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(fg.shape, bool)
    # pixels per (row, piece) and (column, piece) by bincount (ndimage.sum_labels and
    # center_of_mass cost a third of the mask): sizes and centres as exact integer sums
    flat = lab.ravel()
    rows = np.bincount(flat + (n + 1) * np.repeat(np.arange(lab.shape[0]), lab.shape[1]),
                       minlength=(n + 1) * lab.shape[0]).reshape(lab.shape[0], n + 1)[:, 1:]
    sizes = rows.sum(0).astype(np.float64)
    big = np.nonzero(sizes >= 0.01 * sizes.max())[0].tolist()
    if len(big) > 1:          # centres are only asked of candidates to join the largest piece
        cols = np.bincount(flat + (n + 1) * np.tile(np.arange(lab.shape[1]), lab.shape[0]),
                           minlength=(n + 1) * lab.shape[1]).reshape(lab.shape[1], n + 1)[:, 1:]
        centres = np.stack([np.arange(lab.shape[0]) @ rows, np.arange(lab.shape[1]) @ cols],
                           1) / sizes[:, None]
    # grow from the largest piece: a piece joins when its centre lies within 3 % of the side
    # of the hull so far (ribs, chest wall) or a quarter of it lies inside the hull (heart and
    # anterior chest wall cut off by black fat, whose centre is beyond the lungs' hull); the
    # table lies farther below and never joins
    kept = {int(np.argmax(sizes))}
    near = int(round(0.03 * max(fg.shape)))
    for _ in range(8):
        if len(kept) == 1:
            pieces = lab == next(iter(kept)) + 1
        else:
            chosen = np.zeros(n + 1, bool)
            chosen[[i + 1 for i in kept]] = True
            pieces = chosen[lab]
        hull, v = _filled_hull(pieces)
        share = np.bincount(flat[hull.ravel()], minlength=n + 1)[1:] / sizes
        cand = [i for i in big if i not in kept]
        if not cand:
            break
        if v is not None:
            close = _polygon_distance(np.round([centres[i] for i in cand]), v) <= near
        else:
            zone = ndimage.binary_dilation(hull, disk(near)) if near else hull
            close = np.array([zone[int(round(centres[i][0])), int(round(centres[i][1]))] for i in cand])
        more = {i for i, c in zip(cand, close) if c or share[i] >= 0.25}
        if not more:
            break
        kept |= more
    return hull


def _blocks(x: np.ndarray, step: int, ufunc) -> np.ndarray:
    """``ufunc``-reduce each ``step`` x ``step`` block of ``x`` (a ragged edge is dropped)."""
    if step == 1:
        return x
    h, w = (x.shape[0] // step) * step, (x.shape[1] // step) * step
    out = x[:h:step, :w:step].copy()
    for i in range(step):
        for j in range(step):
            ufunc(out, x[i:h:step, j:w:step], out=out)
    return out


def close_open(mask: np.ndarray) -> np.ndarray:
    """``binary_opening(binary_closing(mask, disk(2)), disk(2))`` as scipy computes it
    (outside the image counts as background), by in-place shifted ORs and ANDs: disk(2) is
    a 3 x 3 square plus the four pixels at distance 2 (~9x faster than scipy at 256 px).

    >>> close_open(np.pad(np.ones((9, 9), bool), 4)).sum()      # a square loses its corners
    np.int64(69)
    """
    return _disk2(_disk2(_disk2(_disk2(mask, True), False), False), True)


def _disk2(m: np.ndarray, grow: bool) -> np.ndarray:
    """Dilation (``grow``) or erosion of ``m`` by disk(2), zeros beyond the border."""
    if grow:
        v = m.copy()
        v[1:] |= m[:-1]
        v[:-1] |= m[1:]
        out = v.copy()
        out[:, 1:] |= v[:, :-1]
        out[:, :-1] |= v[:, 1:]
        out[2:] |= m[:-2]
        out[:-2] |= m[2:]
        out[:, 2:] |= m[:, :-2]
        out[:, :-2] |= m[:, 2:]
        return out
    v = m.copy()
    v[1:] &= m[:-1]
    v[:-1] &= m[1:]
    v[[0, -1]] = False
    out = v.copy()
    out[:, 1:] &= v[:, :-1]
    out[:, :-1] &= v[:, 1:]
    out[:, [0, -1]] = False
    out[2:] &= m[:-2]
    out[:-2] &= m[2:]
    out[:, 2:] &= m[:, :-2]
    out[:, :-2] &= m[:, 2:]
    out[:2], out[-2:], out[:, :2], out[:, -2:] = False, False, False, False
    return out


def filled_hull(mask: np.ndarray) -> np.ndarray:
    """Convex hull of ``mask`` filled (the mask's own pixels always in), like
    ``skimage.morphology.convex_hull_image`` but ~4x faster (2 vs 8.7 ms at 256 px): the hull
    of the pixel centres is scan-filled instead of testing every pixel of the grid against it.

    >>> int(filled_hull(np.eye(4, dtype=bool) | np.eye(4, dtype=bool)[::-1]).sum())   # an X -> a square
    16
    """
    return _filled_hull(mask)[0]


def _filled_hull(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(:func:`filled_hull`, its polygon's vertices (k, 2) counter-clockwise, or None when
    the mask is a line or has under 3 pixels)."""
    from scipy.spatial import ConvexHull, QhullError
    rows = np.nonzero(mask.any(1))[0]
    left = mask.argmax(1)[rows]
    right = mask.shape[1] - 1 - mask[:, ::-1].argmax(1)[rows]
    # each row's ends span the same hull as all the pixels
    pts = np.concatenate([np.stack([rows, left], 1), np.stack([rows, right], 1)])
    if len(pts) < 3:
        return mask.copy(), None
    try:
        v = pts[ConvexHull(pts).vertices].astype(np.float64)
    except QhullError:                      # all on one line: nothing to fill
        return convex_hull_image(mask), None
    ys = np.arange(int(v[:, 0].min()), int(v[:, 0].max()) + 1)
    # each edge (a -> b): its x on the rows it spans; a horizontal edge spans its two ends
    (a0, a1), (b0, b1) = v.T[:, :, None], np.roll(v, -1, axis=0).T[:, :, None]
    spans = (ys >= np.minimum(a0, b0)) & (ys <= np.maximum(a0, b0))
    flat = a0 == b0
    with np.errstate(divide="ignore", invalid="ignore"):
        x = a1 + (ys - a0) * (b1 - a1) / (b0 - a0)
    lo = np.where(spans, np.where(flat, np.minimum(a1, b1), x), np.inf).min(0)
    hi = np.where(spans, np.where(flat, np.maximum(a1, b1), x), -np.inf).max(0)
    cols = np.arange(mask.shape[1])
    out = mask.copy()
    # half a pixel wider: the hull of the pixels themselves, as convex_hull_image takes it
    out[ys] |= (cols >= np.ceil(lo - 0.5)[:, None]) & (cols <= np.floor(hi + 0.5)[:, None])
    return out, v


def _polygon_distance(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance of points ``p`` (m, 2) to the convex polygon ``v`` (k, 2); 0 inside."""
    ab = np.roll(v, -1, axis=0) - v
    ap = p[:, None, :] - v[None]
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    d = np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(1)
    cross = ab[None, :, 0] * ap[..., 1] - ab[None, :, 1] * ap[..., 0]
    inside = (cross >= 0).all(1) | (cross <= 0).all(1)
    return np.where(inside, 0.0, d)


def body_box(mask: np.ndarray, margin: float = 0.04) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end exclusive, of ``mask`` grown by ``margin`` x its larger side;
    None for an empty mask.

    >>> body_box(np.pad(np.ones((2, 4), bool), 3), margin=0.0)
    (3, 5, 3, 7)
    """
    ys, xs = np.nonzero(np.asarray(mask).any(1))[0], np.nonzero(np.asarray(mask).any(0))[0]
    if len(ys) == 0:
        return None
    return _grown(ys[0], ys[-1], xs[0], xs[-1], mask.shape, margin)


def _grown(y0: int, y1: int, x0: int, x1: int, shape, margin: float) -> tuple[int, int, int, int]:
    """The box of first/last rows and columns ``y0..y1``, ``x0..x1`` (inclusive) grown by
    ``margin`` x its larger side, clipped to ``shape``; end exclusive."""
    m = int(round(margin * max(y1 - y0 + 1, x1 - x0 + 1)))
    return (int(max(0, y0 - m)), int(min(shape[0], y1 + 1 + m)),
            int(max(0, x0 - m)), int(min(shape[1], x1 + 1 + m)))
