"""Map per-slice 2D maps (Grad-CAM) back through every preprocessing step onto the source CT.

The forward transform (``SliceBatch`` contract, ``preprocess.render``) is:
volume -> SimpleITK resample (in-plane ``spec.spacing``, z ``spec.slab_mm``) = ``batch.grid``
-> each grid slice placed at ``(y0, x0)`` in a ``side x side`` square -> bilinear resize
(align_corners=False) to ``size x size``. The inverse, per included slice: bilinear upsample
the map to ``size``, then to ``side``, crop ``[y0:y0+ny, x0:x0+nx]``, put it at grid z
(skipped slices stay 0), give it the grid geometry, and resample linearly onto
``batch.volume.image`` — so the result has the CT's exact size, origin, spacing and
direction (LPS), whatever resampling, padding or obliquity the input had.

Example::

    >>> cam = to_volume(batch, cams.maps[:, 2])          # SimpleITK.Image on the CT grid
    >>> cam.GetOrigin() == batch.volume.image.GetOrigin()
    True
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dicompipe.errors import PreprocessError
from dicompipe.types import SliceBatch

_CHUNK = 32


def _resize(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[-1] == n and t.shape[-2] == n:
        return t
    return F.interpolate(t, size=(n, n), mode="bilinear", align_corners=False,
                         antialias=n < t.shape[-1])


def to_grid(batch: SliceBatch, maps) -> np.ndarray:
    """Maps (n_included, h, w) -> float32 array (grid z, y, x) on ``batch.grid`` (skipped = 0).

    Example::

        >>> to_grid(batch, cams.maps[:, 0]).shape == sitk.GetArrayViewFromImage(batch.grid).shape
        True
    """
    m = np.asarray(maps, dtype=np.float32)
    included = batch.included
    if m.ndim != 3 or m.shape[0] != len(included):
        raise PreprocessError(
            f"to_volume needs one 2D map per included slice, shape ({len(included)}, h, w); "
            f"got {m.shape}. Pass e.g. cams.maps[:, k] for class k.")
    if batch.grid is None or batch.grid.GetDimension() != 3:
        raise PreprocessError("This SliceBatch has no 3D grid image: cannot place maps in space.")
    nx, ny, nz = batch.grid.GetSize()
    y0, x0, side = (int(v) for v in batch.pad)
    if y0 < 0 or x0 < 0 or y0 + ny > side or x0 + nx > side:
        raise PreprocessError(
            f"SliceBatch.pad {batch.pad} does not hold a {ny}x{nx} grid slice: the batch is "
            "inconsistent (pad must be (y0, x0, side) with y0+ny <= side and x0+nx <= side).")
    size = int(batch.spec.size)
    out = np.zeros((nz, ny, nx), np.float32)
    for i in range(0, len(included), _CHUNK):
        part = included[i:i + _CHUNK]
        rows = [s.row for s in part]
        for s in part:
            if s.row is None or not 0 <= s.row < len(m):
                raise PreprocessError(
                    f"Included model slice z={s.z} has row {s.row!r}: the SliceBatch is "
                    "inconsistent (every included slice needs its row in batch.tensors).")
            if not 0 <= s.z < nz:
                raise PreprocessError(f"Model slice z={s.z} lies outside the grid (0..{nz - 1}).")
        t = torch.from_numpy(np.ascontiguousarray(m[rows]))[:, None]
        t = _resize(_resize(t, size), side)          # model input size, then the padded square
        out[[s.z for s in part]] = t[:, 0, y0:y0 + ny, x0:x0 + nx].numpy()
    return out


def to_volume(batch: SliceBatch, maps, *, default: float = 0.0) -> sitk.Image:
    """Maps (n_included, h, w) -> float32 SimpleITK image on the source volume's exact grid.

    Linear interpolation from the model grid; voxels within one grid voxel outside the grid's
    outermost voxel centres take the edge value (the half-voxel rim the forward resampling
    also covered); anything farther is ``default``. When the model slices name the volume
    slices they cover (``ModelSlice.volume_z``, e.g. slabs), volume slices that no included
    model slice covers (skipped slabs, edge slices left out of a slab) are set to ``default``.

    Example::

        >>> img = to_volume(batch, cams.maps[:, 1])
        >>> img.GetSize() == batch.volume.image.GetSize()
        True
    """
    if batch.volume is None or batch.volume.image is None:
        raise PreprocessError("This SliceBatch carries no source volume to map back onto.")
    grid_arr = to_grid(batch, maps)
    padded = sitk.GetImageFromArray(np.pad(grid_arr, 1, mode="edge"))
    g = batch.grid
    padded.SetSpacing(g.GetSpacing())
    padded.SetDirection(g.GetDirection())
    padded.SetOrigin(g.TransformContinuousIndexToPhysicalPoint((-1.0, -1.0, -1.0)))
    ref = batch.volume.image
    out = sitk.Resample(padded, ref, sitk.Transform(), sitk.sitkLinear, float(default),
                        sitk.sitkFloat32)
    if any(s.volume_z for s in batch.slices):
        covered = {z for s in batch.included for z in s.volume_z}
        nz = ref.GetSize()[2]
        outside = [z for z in range(nz) if z not in covered]
        if outside:
            arr = sitk.GetArrayFromImage(out)
            arr[outside] = default
            masked = sitk.GetImageFromArray(arr)
            masked.CopyInformation(out)
            out = masked
    return out
