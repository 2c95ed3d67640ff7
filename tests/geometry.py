"""Volumes and slice batches with known geometry, for the preprocess and explain tests
(the forward transform of the SliceBatch contract, done by hand).

Example::

    >>> vol = make_volume(blob((20, 64, 64), (10, 30, 30), 5), direction=OBLIQUE)
    >>> batch = make_batch(vol, PreprocessSpec(size=64))
"""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from dicompipe.preprocess.render import resize, square_pad
from dicompipe.types import InstanceRef, ModelSlice, SeriesInfo, SliceBatch, Volume


def rotation(axis, deg):
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_volume(arr, spacing=(0.7, 0.8, 2.5), origin=(-120.0, -90.0, -300.0), direction=None):
    """A Volume (HU, LPS) from a (z, y, x) array with the given geometry."""
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.asarray(direction if direction is not None else np.eye(3)).ravel()))
    nz = img.GetSize()[2]
    series = SeriesInfo(key="t", kind="nifti", source="memory")
    return Volume(image=img, slices=[[InstanceRef(file=f"slice{z}")] for z in range(nz)],
                  series=series)


def make_batch(volume, spec, skip=()):
    """The forward transform of the SliceBatch contract, done by hand.

    Grid: the volume resampled (linear) to spec.spacing in-plane and spec.slab_mm in z, same
    direction, same first-voxel centre; each slice square-padded and resized to spec.size.
    Returns (batch, grid_array) where grid_array is the resampled volume (z, y, x).
    """
    src = volume.image
    sp_in = np.array(src.GetSpacing())
    size_in = np.array(src.GetSize())
    sp = np.array([spec.spacing or sp_in[0], spec.spacing or sp_in[1], spec.slab_mm or sp_in[2]])
    n = np.maximum(1, np.floor((size_in - 1) * sp_in / sp + 1e-6).astype(int) + 1)
    grid = sitk.Resample(src, [int(v) for v in n], sitk.Transform(), sitk.sitkLinear,
                         src.GetOrigin(), tuple(float(v) for v in sp), src.GetDirection(),
                         0.0, sitk.sitkFloat32)
    g = sitk.GetArrayFromImage(grid)
    rows, slices = [], []
    pad = None
    for z in range(g.shape[0]):
        sq, pad = square_pad(g[z][None])
        included = z not in skip
        slices.append(ModelSlice(z=z, volume_z=[], sources=[], included=included,
                                 skip_reason=None if included else "test",
                                 row=len(rows) if included else None))
        if included:
            rows.append(resize(sq, spec.size))
    batch = SliceBatch(tensors=np.stack(rows).astype(np.float32), slices=slices, spec=spec,
                       grid=grid, pad=pad, volume=volume)
    return batch, g


def blob(shape, centre_zyx, radius_vox):
    zz, yy, xx = np.indices(shape)
    d2 = sum(((a - c) / r) ** 2 for a, c, r in zip((zz, yy, xx), centre_zyx, radius_vox))
    return (d2 <= 1.0).astype(np.float32)


def centroid_lps(img):
    a = sitk.GetArrayFromImage(img).astype(np.float64)
    zz, yy, xx = np.indices(a.shape)
    w = a.sum()
    c = [float((xx * a).sum() / w), float((yy * a).sum() / w), float((zz * a).sum() / w)]
    return np.array(img.TransformContinuousIndexToPhysicalPoint(c))


OBLIQUE = rotation(2, 20) @ rotation(0, 12)
