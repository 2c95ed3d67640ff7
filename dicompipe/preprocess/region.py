"""Where an organ's findings can lie: the lung fields of an HU grid, mapped to model input.

A lung tumour lies in or against the lung: in the air-filled lung, in a mass that replaced
it, or against its border (pleura, mediastinum, diaphragm). :func:`lung_fields` finds the
air-filled lung in 3D — air inside the body whose 3D piece is large (the lungs and airways;
stomach and bowel gas under the diaphragm are separate, smaller pieces), holes filled per
slice (masses inside the lung) and widened in-plane by ``margin_mm`` (masses against its
border); it works on a ~3 mm pitch. :func:`model_space` maps such a mask onto each included
slice's model input (the same padding and resize as rendering), as the fraction of each
model pixel inside it.

HU input only: 8-bit PNG/JPG slices carry no HU, so they get no region.

:func:`gray_lung_fields` finds the lung fields on a rendered 8-bit slice instead (the
model's own representation, from HU or from an export alike); :func:`lung_only` widens them
into the mask a ``PreprocessSpec.input_region`` "lung_fields" bundle sees its input through.

Example::

    >>> fields, step = lung_fields(sitk.GetArrayViewFromImage(batch.grid), 0.8, margin_mm=20)
    >>> frac = model_space(batch, fields, step)    # (n_included, size, size) in 0..1
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import disk

from dicompipe.preprocess.body import filled_hull
from dicompipe.preprocess.resize import resize
from dicompipe.preprocess.selection import fill_holes
from dicompipe.types import SliceBatch

_STEP_MM = 3.0          # lung fields are found on a grid of about this pitch (in-plane)
GRAY_SIDE = 256         # the side (px) :func:`gray_lung_fields` is tuned for (~1.3 mm a px)


def gray_lung_fields(img: np.ndarray) -> np.ndarray:
    """Lung-field mask of a rendered chest slice (256, 256) in [0, 1]: regions inside the body
    that are dark over 11 x 11 px (~14 mm; thin fat layers and vessels are not), each
    >= 1.5 % of the body.

    >>> img = np.full((256, 256), 0.6, np.float32); img[60:200, 40:110] = 0
    >>> int(gray_lung_fields(img).sum())
    9800
    """
    body = filled_hull(ndimage.binary_closing(img > 0.15, disk(2)))
    inner = ndimage.binary_erosion(body, disk(4))
    dark = (ndimage.uniform_filter(img, 11) < 0.05) & inner
    lab, n = ndimage.label(dark)
    if n == 0:
        return dark
    sizes = ndimage.sum_labels(dark, lab, np.arange(1, n + 1))
    return np.isin(lab, 1 + np.nonzero(sizes >= 0.015 * max(1, body.sum()))[0])


def lung_only(img: np.ndarray, margin: float) -> np.ndarray:
    """Where a lung finding can lie on a rendered slice (256, 256) in [0, 1]: the
    :func:`gray_lung_fields`, holes filled (masses inside the lung), widened by ``margin`` x
    the side (a square; masses against the pleura, mediastinum or diaphragm). All False
    when the slice shows no lung field.

    >>> img = np.full((256, 256), 0.6, np.float32); img[60:200, 40:110] = 0
    >>> int(lung_only(img, 0.05)[130, 118]), int(lung_only(img, 0.05)[130, 130])
    (1, 0)
    """
    fields = fill_holes(gray_lung_fields(img))
    r = int(round(margin * img.shape[-1]))
    return ndimage.maximum_filter(fields, size=2 * r + 1) if r > 0 and fields.any() else fields


def lung_fields(hu: np.ndarray, spacing_mm: float, margin_mm: float, *, air_hu: float = -400.0,
                body_hu: float = -500.0, min_share: float = 0.1) -> tuple[np.ndarray, int]:
    """``(mask, step)``: the lung fields of an HU grid (z, y, x) with in-plane pixel
    ``spacing_mm``, as a bool mask of the grid's every ``step``-th pixel (the centres of
    ``step`` x ``step`` blocks; ``step`` makes a pitch of about 3 mm).

    Air (< ``air_hu``) inside the body (> ``body_hu``, holes filled, per slice) whose 3D
    piece holds at least ``min_share`` of the largest one's voxels; holes filled per slice;
    widened in-plane by ``margin_mm`` (a square: up to 1.4x that on the diagonals). All False
    when the grid holds no such air.

    >>> hu = np.full((3, 40, 40), 40.0); hu[:, 10:30, 5:15] = hu[:, 10:30, 25:35] = -850
    >>> mask, step = lung_fields(hu, 1.0, 0.0)
    >>> step, int(mask.sum()) * step ** 2
    (3, 1296)
    """
    step = max(1, int(_STEP_MM // spacing_mm))
    sub = np.asarray(hu[:, step // 2::step, step // 2::step], np.float32)
    body = fill_holes(sub > body_hu)
    lab, n = ndimage.label((sub < air_hu) & body)
    if n == 0:
        return np.zeros(sub.shape, bool), step
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    keep = sizes >= min_share * sizes.max()
    lungs = fill_holes(keep[lab])
    r = int(round(margin_mm / (step * spacing_mm)))
    if r > 0 and lungs.any():
        # a square of +-margin in-plane: separable (0.07 s for 300 slices of 122 x 171, a
        # distance map 0.9-1.6 s)
        lungs = ndimage.maximum_filter(lungs, size=(1, 2 * r + 1, 2 * r + 1))
    return lungs, step


def model_space(batch: SliceBatch, mask: np.ndarray, step: int = 1) -> np.ndarray:
    """Fraction (n_included, size, size) float32 of each model-input pixel inside ``mask``
    (z, y, x on ``batch.grid``, or on its every ``step``-th pixel as :func:`lung_fields`
    gives it), through the batch's square padding and resize (to within ``step`` pixels).

    >>> model_space(batch, np.ones(sitk.GetArrayViewFromImage(batch.grid).shape, bool)).max()
    """
    y0, x0, side = (int(v) // step for v in batch.pad)
    side = max(side, y0 + mask.shape[1], x0 + mask.shape[2])
    size = int(batch.spec.size)
    included = batch.included
    out = np.zeros((len(included), size, size), np.float32)
    for i in range(0, len(included), 64):
        part = included[i:i + 64]
        sq = np.zeros((len(part), side, side), np.float32)
        sq[:, y0:y0 + mask.shape[1], x0:x0 + mask.shape[2]] = mask[[s.z for s in part]]
        out[[s.row for s in part]] = resize(sq, (size, size))
    return np.clip(out, 0.0, 1.0)
