"""Synthetic lesions for label-free, tumour-centred pretraining.

Lesions are drawn into lesion-free rendered slices (the model's own 8-bit representation,
after body mask and crop), with a mask that the trainer uses as a location target, after
label-free tumour synthesis (Hu et al., CVPR 2023; Li et al., 2023 for the pancreas).

- **lung**: inside the lung fields (dark regions enclosed by the body), solid, round to
  lobulated or spiculated, 5-60 mm; "benign-like" = small (5-15 mm), smooth, sometimes
  calcified; "malignant-like" = 15-60 mm, lobulated or spiculated, sometimes part-solid.
  Size and margin are the strongest radiological malignancy cues (Lung-RADS); that is the
  only link between these shapes and the real classes. Ground-glass is not drawn: the lung
  bundle's representation sets everything below 0 HU to black, as the IQ-OTH/NCCD export
  does, so ground-glass is invisible in it.
- **pancreas**: hypo-attenuating (darker than the tissue around it), ill-defined edges,
  8-40 mm, centred on soft tissue in the central abdomen (the pancreas lies centrally,
  in front of the spine; on 8-bit slices without a label this box is the organ prior).

Texture comes from the slice itself: a lung lesion is tiled from a soft-tissue square of
the same slice, scaled to a dense-tissue level but otherwise untouched (the speckle of an
8-bit export or the smooth grey of a 5 mm DICOM): a lesion smoother or noisier than the
slice's own tissue would teach "smooth grey = tumour", which every DICOM rendering then
satisfies. Half of the malignant-like lesions touch the lung's border (pleura, mediastinum,
diaphragm), as most large carcinomas do. A pancreas lesion only darkens the texture under
it (no flattening, no extra noise); edges get a partial-volume ramp.

Example::

    >>> rng = np.random.default_rng(0)
    >>> lung = lung_fields(img)                       # img: float (s, s) in [0, 1]
    >>> out, mask = insert_lung_lesion(img, lung, "malignant", rng)
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from dicompipe.preprocess.region import gray_lung_fields as lung_fields  # noqa: F401  (re-exported)

MM_PER_PX = 1.3          # a ~330 mm wide body crop rendered at 256 px


def _shape(r: float, rng, lobes: float, spikes: int, edge: float) -> np.ndarray:
    """Alpha map (soft-edged) of a lesion of radius ``r`` px: lobulated outline plus spikes."""
    half = int(np.ceil(r * (1.0 + lobes + (0.9 if spikes else 0.0)) + 3 * edge + 2))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float32)
    rho, th = np.hypot(yy, xx), np.arctan2(yy, xx)
    rad = np.ones_like(th)
    for k in range(2, 6):
        rad += lobes * rng.uniform(0, 1) / (k - 1) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    for _ in range(spikes):
        d = np.angle(np.exp(1j * (th - rng.uniform(-np.pi, np.pi))))
        rad += rng.uniform(0.4, 0.9) * np.exp(-0.5 * (d / rng.uniform(0.03, 0.07)) ** 2)
    return 1.0 / (1.0 + np.exp(-(r * rad - rho) / edge))


def _paste(alpha: np.ndarray, cy: int, cx: int, shape) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    h = alpha.shape[0] // 2
    y0, x0 = cy - h, cx - h
    ys = slice(max(0, y0), min(shape[0], y0 + alpha.shape[0]))
    xs = slice(max(0, x0), min(shape[1], x0 + alpha.shape[1]))
    out[ys, xs] = alpha[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return out


def soft_tissue(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, 15 px mean) of the slice's soft tissue: denser than lung or fat on average
    (mean > 0.08: the sparse speckle of some exports' heart counts), no bone within 2 px."""
    smooth = ndimage.uniform_filter(img, 15)
    return (smooth > 0.08) & (smooth < 0.8) & (ndimage.maximum_filter(img, 5) < 0.9), smooth


def tissue_texture(img: np.ndarray, level: float, rng, tissue: np.ndarray | None = None) -> np.ndarray | None:
    """A full-size texture (s, s) tiled, with random flips, from a square inside the slice's
    thickest soft tissue (``tissue``, default :func:`soft_tissue`: heart, liver, muscle),
    scaled so its mean is ``level``; None when the slice has none."""
    if tissue is None:
        tissue = soft_tissue(img)[0]
    depth = ndimage.distance_transform_edt(tissue)
    if depth.max() < 6:          # a tile under ~8 px would repeat visibly
        return None
    ys, xs = np.nonzero(depth >= 0.7 * depth.max())
    i = int(rng.integers(len(ys)))
    h = max(4, int(depth[ys[i], xs[i]] / 1.5))
    tile = img[max(0, ys[i] - h):ys[i] + h, max(0, xs[i] - h):xs[i] + h]
    tile = tile * (level / max(float(tile.mean()), 1e-3))
    n = img.shape[0]
    row = [tile[:, ::-1] if rng.uniform() < 0.5 else tile for _ in range(n // tile.shape[1] + 2)]
    band = np.concatenate(row, 1)
    rows = [band[::-1] if rng.uniform() < 0.5 else band for _ in range(n // tile.shape[0] + 2)]
    full = np.concatenate(rows, 0)
    oy, ox = (int(rng.integers(tile.shape[k])) for k in (0, 1))
    return np.ascontiguousarray(full[oy:oy + n, ox:ox + img.shape[1]], np.float32)


def insert_lung_lesion(img: np.ndarray, lung: np.ndarray, kind: str, rng,
                       mm_per_px: float = MM_PER_PX) -> tuple[np.ndarray, np.ndarray] | None:
    """Draw one lesion ("benign" or "malignant"-like) into ``img``; (image, mask) or None
    when the slice has no lung field or soft tissue to take texture from."""
    ys, xs = np.nonzero(lung)
    if len(ys) == 0:
        return None
    mask, smooth = soft_tissue(img)
    tissue = smooth[mask]
    if len(tissue) == 0:
        return None
    if kind == "benign":
        d_mm = rng.uniform(5, 15)
        lobes, spikes, edge = rng.uniform(0, 0.08), 0, rng.uniform(0.5, 1.0)
    else:
        d_mm = float(np.exp(rng.uniform(np.log(15), np.log(60))))
        lobes = rng.uniform(0.1, 0.35)
        spikes = int(rng.integers(0, 14)) if rng.uniform() < 0.6 else 0
        edge = rng.uniform(0.7, 1.8)
    r = max(1.2, d_mm / 2 / mm_per_px)
    if kind == "malignant" and rng.uniform() < 0.5:
        # attached: centred r/4..4r/5 inside the lung's border, so it meets the wall
        inside = ndimage.distance_transform_edt(lung)
        near = np.nonzero(lung & (inside >= 0.25 * r) & (inside <= 0.8 * r))
        if len(near[0]):
            ys, xs = near
    i = int(rng.integers(len(ys)))
    cy, cx = int(ys[i]), int(xs[i])
    alpha = _paste(_shape(r, rng, lobes, spikes, edge), cy, cx, img.shape)
    # a solid tumour is as dense as muscle or blood (the slice's denser soft tissue), never fat
    level = rng.uniform(float(np.percentile(tissue, 60)), float(np.percentile(tissue, 95)))
    patch = tissue_texture(img, level, rng, mask)
    if patch is None:
        return None
    if kind == "benign" and rng.uniform() < 0.3:
        patch = np.full_like(img, rng.uniform(0.85, 1.0))               # calcified
    elif kind == "malignant" and rng.uniform() < 0.25:                  # part-solid: weaker rim
        core = _paste(_shape(r * rng.uniform(0.4, 0.7), rng, lobes, 0, edge), cy, cx, img.shape)
        alpha = np.maximum(alpha * rng.uniform(0.45, 0.7), core)
    out = img * (1 - alpha) + patch * alpha
    return np.clip(out, 0, 1).astype(np.float32), alpha > 0.5


def central_soft_tissue(img: np.ndarray, box=0.2, lo=0.3, hi=0.8) -> np.ndarray:
    """Pancreas prior on a rendered abdominal slice: soft tissue (smoothed grey in [lo, hi])
    inside the central ``box`` (fraction of the side around the centre) of the body crop."""
    n = img.shape[0]
    smooth = ndimage.uniform_filter(img, 7)
    m = (smooth > lo) & (smooth < hi)
    c = np.zeros_like(m)
    a, b = int(n * (0.5 - box)), int(n * (0.5 + box))
    c[a:b, a:b] = True
    return m & c


def insert_pancreas_lesion(img: np.ndarray, region: np.ndarray, rng,
                           mm_per_px: float = MM_PER_PX) -> tuple[np.ndarray, np.ndarray] | None:
    """A hypo-attenuating, ill-defined lesion (8-40 mm) centred in ``region``; (image, mask)
    or None. The tissue under it keeps its own texture, only darkened: a lesion smoother or
    noisier than the slice would mark itself by texture, not by attenuation."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return None
    r = max(2.0, rng.uniform(8, 40) / 2 / mm_per_px)
    i = int(rng.integers(len(ys)))
    alpha = _paste(_shape(r, rng, rng.uniform(0.05, 0.25), 0, rng.uniform(1.0, 3.5)),
                   int(ys[i]), int(xs[i]), img.shape)
    local = ndimage.uniform_filter(img, 9)
    # 0.08-0.45 is what a 20-60 HU drop in the pancreas becomes after the 2.x rendering
    # (window, body mask, equalisation) of the shared abdomen series
    depth = rng.uniform(0.08, 0.45)
    out = img - alpha * depth * np.clip(local / 0.6, 0.5, 1.2)
    return np.clip(out, 0, 1).astype(np.float32), alpha > 0.5
