"""NIfTI output (``ct.nii.gz``, ``cam_<label>.nii.gz``) with the exact geometry of the CT.

DICOM/SimpleITK geometry is LPS; NIfTI's qform/sform map voxel (i, j, k) to RAS. So
``affine = diag(-1, -1, 1, 1) @ [[D @ diag(spacing), origin], [0, 0, 0, 1]]`` with D the
direction matrix (columns = LPS directions of the x, y, z voxel axes) — the same convention
ITK/SimpleITK and nibabel use, so every viewer puts the volume where the scanner did. Images
written from the same grid get bit-identical affines, so a CAM overlays its CT exactly.

Example::

    >>> write_nifti(volume.image, run / "ct.nii.gz")
    >>> write_nifti(cams.volumes["malignant"], run / "cam_malignant.nii.gz",
    ...             description="Grad-CAM malignant", display_range=(0, cams.scale["malignant"]))
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicompipe.errors import ReportError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 RAS voxel-to-world affine NIfTI stores for a 3D SimpleITK image (LPS).

    Example::

        >>> nifti_affine(sitk.Image(4, 4, 4, sitk.sitkFloat32))[:3, :3]   # diag(-1, -1, 1)
    """
    if image.GetDimension() != 3:
        raise ReportError(f"NIfTI output expects a 3D image, got {image.GetDimension()}D.")
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def write_nifti(image: sitk.Image, path, *, description: str | None = None,
                display_range: tuple[float, float] | None = None, dtype=None,
                scaled: bool = False, slope: float | None = None) -> Path:
    """Write a 3D SimpleITK image (LPS) as NIfTI-1 with qform = sform = the RAS affine.

    ``dtype``: cast the voxels (e.g. ``np.int16`` for HU, rounded); default keeps them.
    ``scaled``: with an integer ``dtype``, store the values scaled into its range with the
    header's scl_slope/scl_inter (a Grad-CAM map as uint8 is a quarter of float32 and
    compresses far better; every reader applies the scale, so values stay in their units).
    ``slope``: the image already holds scaled integers (e.g. from
    ``preprocess.to_volume_uint8``): stored as they are, with scl_slope = ``slope``.
    ``display_range``: stored as cal_min/cal_max (viewers' default window).
    Returns the path written. Raises :class:`ReportError` for a bad path or image.

    Example::

        >>> write_nifti(cam_image, "out/cam_malignant.nii.gz")
        PosixPath('out/cam_malignant.nii.gz')
    """
    import nibabel as nib

    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise ReportError(f"NIfTI file name must end in .nii.gz or .nii: {path}")
    if not isinstance(image, sitk.Image) or image.GetNumberOfComponentsPerPixel() != 1:
        raise ReportError(f"write_nifti needs a scalar 3D SimpleITK image, got {type(image).__name__}.")
    affine = nifti_affine(image)
    # (z, y, x) -> (i, j, k): a view, Fortran-ordered like NIfTI on disk, so nothing is
    # copied (a 512x512x300 float map is 315 MB)
    data = np.transpose(sitk.GetArrayViewFromImage(image), (2, 1, 0))
    if dtype is not None and scaled:
        dt = np.dtype(dtype)               # nibabel picks slope/inter for the float data
        data = data.astype(np.float32, copy=False)
    elif dtype is not None:
        dt = np.dtype(dtype)
        if np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            data = np.clip(np.rint(data), info.min, info.max)
        data = data.astype(dt)
    img = nib.Nifti1Image(data, affine)
    if scaled and dtype is not None:
        img.set_data_dtype(dt)
    if slope is not None:
        img.header.set_slope_inter(float(slope), 0.0)
    img.set_qform(affine, code=1)           # 1 = scanner-based anatomical coordinates
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    if display_range is not None:
        img.header["cal_min"], img.header["cal_max"] = map(float, display_range)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    except OSError as e:
        raise ReportError(f"Cannot write NIfTI {path}: {e.strerror or e}.") from e
    return path
