"""Grad-CAM in closed form from the layer4 activations the forward pass already returned.

For a ResNet whose head is layer4 -> global average pool -> one linear layer, the score of
class c is ``s_c = sum_k w_ck * mean_ij A_kij + b_c``, so ``d s_c / d A_kij = w_ck / (H*W)``
at every position. Grad-CAM's channel weight (the spatial mean of that gradient) is therefore
``w_ck / (H*W)`` and

    Grad-CAM_c = ReLU(sum_k w_ck A_k) / (H*W)

— the same map up to a positive factor, for every class at once, with no backward pass.
The raw maps kept in :class:`~dicompipe.types.CamStack` are ``ReLU(sum_k w_ck A_k)``.

Grad-CAM++ (as pytorch-grad-cam implements eq. 19 of arXiv:1710.11063) only needs the
gradient ``g = w_ck/(H*W)`` and the channel sums ``S_k = sum_ij A_kij``; with a constant
gradient its per-position coefficient is ``g^2 / (2 g^2 + S_k g^3 + eps)`` and the channel
weight ``(H*W) * ReLU(g) * that``: also closed form (``method="gradcam++"``).

Example::

    >>> from dicompipe import explain
    >>> cams = explain.gradcam(predictions)               # all classes, no second pass
    >>> cams.display(row=0, label="malignant").max()       # <= 1, one scale per volume
    >>> cams.volumes["malignant"]                          # SimpleITK image on the CT grid
"""
from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import numpy as np

from dicompipe.errors import ModelError
from dicompipe.preprocess.resize import resize
from dicompipe.types import CamStack, SlicePredictions

METHODS = ("gradcam", "gradcam++")
#: pytorch-grad-cam's epsilon in the Grad-CAM++ coefficient (kept so both paths agree)
GRADCAM_PP_EPS = 1e-6


def class_maps(features: np.ndarray, head_weight: np.ndarray, method: str = "gradcam",
               eps: float = GRADCAM_PP_EPS) -> np.ndarray:
    """Raw CAMs (n, K, h, w) from layer4 activations (n, C, h, w) and a linear head (K, C).

    ``method="gradcam"``: ``ReLU(sum_k w_ck A_k)``; ``"gradcam++"``: closed-form Grad-CAM++.
    ReLU applied, not normalised.

    Example::

        >>> maps = class_maps(preds.features, preds.head_weight)   # (n, K, 7, 7)
    """
    if method not in METHODS:
        raise ValueError(f"Unknown CAM method {method!r}: choose one of {', '.join(METHODS)}.")
    a = np.asarray(features, dtype=np.float32)
    w = np.asarray(head_weight, dtype=np.float32)
    if a.ndim != 4 or w.ndim != 2 or a.shape[1] != w.shape[1]:
        raise ModelError(
            f"Grad-CAM needs layer4 features (n, C, h, w) and a head weight (K, C); got "
            f"{a.shape} and {w.shape}. Check that the bundle's head is GAP + one linear layer.")
    n, c, h, wd = a.shape
    if method == "gradcam":
        # (n, C, h*w) x (K, C) -> (n, K, h*w); matmul is a BLAS call, cheap next to the forward
        cam = np.matmul(w[None], a.reshape(n, c, h * wd))
    else:
        g = (w / float(h * wd))[None]                              # (1, K, C) constant gradient
        s = a.reshape(n, c, h * wd).sum(-1)[:, None, :]            # (n, 1, C) channel sums
        g2 = g * g
        coeff = g2 / (2.0 * g2 + s * g2 * g + eps)
        coeff = np.where(g != 0, coeff, 0.0)
        weights = (h * wd) * np.maximum(g, 0.0) * coeff           # (n, K, C)
        cam = np.matmul(weights.astype(np.float32), a.reshape(n, c, h * wd))
    return np.maximum(cam, 0.0).reshape(n, w.shape[0], h, wd).astype(np.float32, copy=False)


def upsample(maps: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (..., h, w) maps to ``size`` (align_corners=False, like cv2.resize).

    Example::

        >>> upsample(np.ones((2, 7, 7)), 224).shape
        (2, 224, 224)
    """
    m = np.asarray(maps, dtype=np.float32)
    hw = (size, size) if np.isscalar(size) else tuple(size)
    if m.shape[-2:] == hw:
        return m.copy()
    return resize(m, hw)


def evidence_inside(maps: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mass, share), each (n, K), of each raw map inside ``region`` ((n, size, size)
    fractions in 0..1 on the model input, ``preprocess.region.model_space``): ``mass`` is the
    map's mean over the input inside the region, in Grad-CAM units comparable between the
    slices of one volume (the class's evidence there); ``share`` is the part of the map's mass
    that lies inside (0 where a map is empty: no located evidence on that slice). Maps
    (n, K, h, w) are upsampled to the input size as the reports upsample them.

    Example::

        >>> mass, share = evidence_inside(cams.maps, model_space(batch, *lung_fields(hu, 0.8, 20)))
    """
    m = np.asarray(maps, np.float32)
    r = np.asarray(region, np.float32)
    n, k = m.shape[:2]
    mass = np.zeros((n, k), np.float64)
    share = np.zeros((n, k), np.float64)
    for i in range(0, n, 32):
        up = upsample(m[i:i + 32], r.shape[-2:])                       # (b, K, size, size)
        total = up.sum(axis=(-2, -1), dtype=np.float64)
        inside = np.einsum("bkyx,byx->bk", up, r[i:i + 32], dtype=np.float64)
        mass[i:i + 32] = inside / (r.shape[-1] * r.shape[-2])
        share[i:i + 32] = np.where(total > 0, inside / np.maximum(total, 1e-30), 0.0)
    return mass, np.clip(share, 0.0, 1.0)


def normalise_like_grad_cam(maps: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing: ReLU, bilinear upsample to ``size``, min-max per image.

    pytorch-grad-cam does ReLU -> min-max -> cv2.resize (INTER_LINEAR) -> min-max; min-max is
    affine and bilinear weights sum to one, so that equals ReLU -> resize -> min-max, which
    is what this computes (bilinear, align_corners=False = cv2's half-pixel mapping).

    Example::

        >>> normalise_like_grad_cam(cams.maps[:, 2], 224)     # (n, 224, 224) in [0, 1]
    """
    m = upsample(np.maximum(np.asarray(maps, dtype=np.float32), 0.0), size)
    lo = m.min(axis=(-2, -1), keepdims=True)
    m = m - lo
    return (m / (1e-7 + m.max(axis=(-2, -1), keepdims=True))).astype(np.float32)


def display_scale(maps: np.ndarray, how: str | float = "max") -> float:
    """One display maximum for a class over the whole volume from its maps (n, h, w).

    ``"max"`` (default): the largest value over all analysed slices. CAMs are 7x7 averages of
    2048 channels — smooth, without single-voxel outliers — so the maximum is stable, and it
    keeps the ordering between the hottest slices visible (a percentile would saturate
    exactly the few slices a small nodule lies on). A float ``p`` uses the p-th percentile.
    """
    m = np.asarray(maps, dtype=np.float64)
    if m.size == 0:
        return 0.0
    if how == "max":
        return float(m.max())
    return float(np.percentile(m, float(how)))


def _class_indices(labels: list[str], classes) -> list[int]:
    if classes is None:
        return list(range(len(labels)))
    if isinstance(classes, (str, int, np.integer)):
        classes = [classes]
    out = []
    for c in classes:
        if isinstance(c, (int, np.integer)):
            if not 0 <= int(c) < len(labels):
                raise ModelError(f"Class index {c} out of range for labels {labels}.")
            out.append(int(c))
        elif c in labels:
            out.append(labels.index(c))
        else:
            raise ModelError(f"Unknown class {c!r}: the model's labels are {labels}.")
    return out


def gradcam(predictions: SlicePredictions, classes: Sequence[str | int] | str | None = None,
            method: str = "gradcam", *, volumes: bool = True,
            scale: str | float = "max") -> CamStack:
    """Grad-CAM for every analysed slice and class from ``predictions`` (no second pass).

    ``classes``: labels or indices (default: all). ``method``: "gradcam" or "gradcam++"
    (both closed form for a GAP + linear head; for other heads use
    :func:`dicompipe.explain.autograd.autograd_cam`). ``volumes``: also map each class back
    onto the source CT grid (``CamStack.volumes``) when the batch carries a volume.
    ``scale``: how the per-class display maximum is chosen (see :func:`display_scale`).

    Example::

        >>> cams = gradcam(preds, classes=["malignant"])
        >>> cams.maps.shape                 # (n_included, 1, 7, 7)
    """
    if predictions.features is None:
        raise ModelError(
            "These predictions carry no layer4 features, so the closed-form Grad-CAM cannot "
            "run. Predict with a backend that returns layer4 (torch, or ONNX exported with "
            "the features output), or use dicompipe.explain.autograd.autograd_cam(model, x).")
    idx = _class_indices(list(predictions.labels), classes)
    labels = [predictions.labels[i] for i in idx]
    weight = np.asarray(predictions.head_weight)[idx]
    feats = np.asarray(predictions.features)
    if len(feats) == 0:
        maps = np.zeros((0, len(idx)) + tuple(feats.shape[2:] or (0, 0)), np.float32)
    else:
        maps = class_maps(feats, weight, method)
    stack = CamStack(labels=labels, maps=maps,
                     scale={l: display_scale(maps[:, k], scale) for k, l in enumerate(labels)},
                     method=method)
    batch = predictions.batch
    if volumes and batch is not None and getattr(batch, "volume", None) is not None \
            and getattr(batch, "grid", None) is not None and len(maps):
        stack.volumes = CamVolumes(batch, maps, labels)
    return stack


def cam_volume(cams, batch, label: str):
    """``label``'s Grad-CAM on the source CT grid (a SimpleITK image, raw values), or None
    when ``cams`` has no such class. ``cams.volumes`` computes it on first access when
    :func:`gradcam` made it; a CamStack built elsewhere (a plain dict) gets it mapped back
    with ``preprocess.to_volume`` and kept there.

    >>> img = cam_volume(analysis.cams, analysis.batch, "malignant")
    """
    if cams is None or label not in cams.labels:
        return None
    img = cams.volumes.get(label)
    if img is None:
        from dicompipe.preprocess.inverse import to_volume
        img = cams.volumes[label] = to_volume(batch, cams.maps[:, cams.labels.index(label)])
    return img


def cam_volume_uint8(cams, batch, label: str):
    """``label``'s Grad-CAM on the source CT grid as (uint8 SimpleITK image, scale), value =
    uint8 x scale (what a NIfTI stores), or None when ``cams`` has no such class: quantised
    from the float volume when that is already made, else made directly
    (``preprocess.to_volume_uint8``: ~10x faster, a quarter of the memory).

    >>> img, scale = cam_volume_uint8(analysis.cams, analysis.batch, "malignant")
    """
    from dicompipe.preprocess.inverse import quantise, to_volume_uint8

    if cams is None or label not in cams.labels:
        return None
    img = _made(cams, label)
    if img is not None:
        return quantise(img)
    return to_volume_uint8(batch, cams.maps[:, cams.labels.index(label)])


def cam_slice(cams, batch, label: str, z: int) -> np.ndarray | None:
    """``label``'s Grad-CAM on CT slice ``z`` (rows, columns; float32 raw values, a copy), or
    None when ``cams`` has no such class. Read from the volume when it is already there;
    otherwise computed for this slice alone (``preprocess.to_slice``), so showing a few
    slices never makes a 315 MB volume.

    >>> cam_slice(analysis.cams, analysis.batch, "malignant", 12).shape
    (512, 512)
    """
    if cams is None or label not in cams.labels:
        return None
    img = _made(cams, label)
    if img is None:
        from dicompipe.preprocess.inverse import to_slice
        arr = to_slice(batch, cams.maps[:, cams.labels.index(label)], z)
        if arr is not None:
            return arr
        img = cam_volume(cams, batch, label)
    import SimpleITK as sitk
    return np.array(sitk.GetArrayViewFromImage(img)[z])      # copied while the image is held


def _made(cams, label: str):
    """``label``'s volume if it is already made (nothing is computed), else None."""
    vols = cams.volumes
    return vols.peek(label) if isinstance(vols, CamVolumes) else vols.get(label)


class CamVolumes(MutableMapping):
    """``CamStack.volumes``: each class's map on the source CT grid, made on first access.

    A map on a 512x512x300 grid is 315 MB, so only the most recently used class is kept;
    ``analyze()`` therefore holds no full-resolution map nobody asked for.

    >>> img = cams.volumes["malignant"]          # SimpleITK image, computed now
    """

    def __init__(self, batch, maps: np.ndarray, labels: list[str]):
        self._batch, self._maps, self._labels = batch, maps, list(labels)
        self._kept: dict = {}

    def __getitem__(self, label):
        img = self._kept.get(label)        # one read: safe while another thread swaps _kept
        if img is None:
            if label not in self._labels:
                raise KeyError(label)
            from dicompipe.preprocess.inverse import to_volume
            img = to_volume(self._batch, self._maps[:, self._labels.index(label)])
            self._kept = {label: img}
        return img

    def __setitem__(self, label, image):
        self._kept = {label: image}

    def peek(self, label):
        """The volume of ``label`` if it is already made, else None (nothing computed)."""
        return self._kept.get(label)

    def __delitem__(self, label):
        self._kept.pop(label, None)

    def __contains__(self, label):
        return label in self._labels

    def __iter__(self):
        return iter(self._labels)

    def __len__(self):
        return len(self._labels)
