"""NIfTI volumes (``.nii``, ``.nii.gz``) read with SimpleITK, whose NIfTI reader converts
the RAS affine of the file to LPS (x and y flipped) — the same convention as DICOM.

``check_affine`` compares the result with nibabel's affine (an independent reader) so a
volume whose qform and sform disagree is reported rather than silently misplaced.

Example::

    >>> from dicompipe import io
    >>> vol = io.load(io.discover("ct.nii.gz")[0])
    >>> vol.image.GetDirection()                 # LPS
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicompipe.errors import UnreadableSeries, UnsupportedInput
from dicompipe.io.limits import BYTES_PER_VOXEL, check_budget
from dicompipe.types import InstanceRef, SeriesInfo, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def lps_affine(img: sitk.Image) -> np.ndarray:
    """4×4 index (x, y, z) → LPS mm affine of a SimpleITK image."""
    a = np.eye(4)
    a[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())[None, :]
    a[:3, 3] = img.GetOrigin()
    return a


def ras_affine(img: sitk.Image) -> np.ndarray:
    """The same affine in RAS (nibabel/NIfTI convention)."""
    return _RAS_TO_LPS @ lps_affine(img)


def _nib_header(path: Path):
    import nibabel as nib
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for damaged files
        raise UnreadableSeries(f"Cannot read NIfTI {path}: {e}") from e


def check_size(path: Path, nimg) -> None:
    """Refuse a header whose dimensions need more bytes than the file can hold (a 416-byte
    ``.nii`` claiming 2048 × 2048 × 1024 voxels): nothing is allocated for it.

    Uncompressed files are compared with their size; for ``.nii.gz`` the gzip trailer's
    uncompressed size is used when the volume is under 4 GiB (the budget covers the rest).
    """
    shape = tuple(int(v) for v in nimg.shape)
    if not shape or min(shape) < 1:
        raise UnreadableSeries(f"NIfTI {path} has dimensions {shape}: no voxels.")
    hdr = nimg.header
    need = int(np.prod(shape, dtype=object)) * hdr.get_data_dtype().itemsize
    offset = int(hdr.get_data_offset() or 0)
    size = path.stat().st_size
    have = size - offset
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(max(0, size - 4))
            tail = f.read(4)
        have = int.from_bytes(tail, "little") - offset if len(tail) == 4 and need < (1 << 32) else need
    if have < need:
        raise UnreadableSeries(
            f"NIfTI {path}: the header says {' x '.join(map(str, shape))} voxels of "
            f"{hdr.get_data_dtype()} ({need} bytes) but the file holds {max(have, 0)} bytes of "
            "data: it is truncated or its header is wrong. Refused before reading any voxel.")


def discover_nifti(path: Path, source: str) -> SeriesInfo:
    """Describe a NIfTI file from its header (nibabel, no voxels read)."""
    import nibabel as nib
    nimg = _nib_header(path)
    check_size(path, nimg)
    shape = nimg.shape
    zooms = nimg.header.get_zooms()
    info = SeriesInfo(key="", kind="nifti", source=str(source),
                      instances=[InstanceRef(file=str(path))],
                      series_description=path.name, columns=int(shape[0]),
                      rows=int(shape[1]) if len(shape) > 1 else 1,
                      pixel_spacing=(float(zooms[1]), float(zooms[0])) if len(zooms) > 1 else None,
                      slice_thickness=float(zooms[2]) if len(zooms) > 2 else None,
                      transfer_syntax="nifti")
    ax = "".join(nib.aff2axcodes(nimg.affine))
    info.orientation = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal",
                        "S": "axial", "I": "axial"}.get(ax[2], None) if len(ax) == 3 else None
    n_z = int(shape[2]) if len(shape) > 2 else 1
    info.spacing_stats = {"min": float(zooms[2]), "median": float(zooms[2]), "max": float(zooms[2]),
                          "largest_gap": float(zooms[2])} if len(zooms) > 2 else {}
    info.instances = [InstanceRef(file=str(path), frame=k) for k in range(n_z)]
    extra = [int(s) for s in shape[3:] if int(s) != 1]
    if extra:
        info.usable, info.unusable_reason = False, (f"{len(shape)}-D NIfTI {tuple(shape)}: "
                                                    "not a single 3-D volume")
    info.warnings.append("NIfTI input: no DICOM headers (no UIDs, modality assumed CT, values taken as HU)")
    return info


def load_nifti(series: SeriesInfo, *, max_memory=None) -> Volume:
    """Read the NIfTI volume as float32 (scl_slope/scl_inter applied), LPS geometry.

    The header's size is checked against the file and ``max_memory`` (see
    :mod:`dicompipe.io.limits`) before SimpleITK allocates the volume."""
    path = Path(series.instances[0].file)
    if not series.usable:
        raise UnreadableSeries(f"{path}: {series.unusable_reason}")
    nimg = _nib_header(path)
    check_size(path, nimg)
    n = int(np.prod([int(v) for v in nimg.shape], dtype=object))
    check_budget(n * (BYTES_PER_VOXEL + nimg.header.get_data_dtype().itemsize),
                 f"NIfTI {path} ({' x '.join(map(str, nimg.shape))} voxels)", max_memory)
    if nimg.header.get_data_dtype().kind in "fc":        # SimpleITK would turn NaN into 0
        bad = int(np.size(nimg.dataobj) - np.count_nonzero(np.isfinite(np.asanyarray(nimg.dataobj))))
        if bad:
            raise UnreadableSeries(f"NIfTI {path}: {bad} voxel(s) are NaN or infinite, so the "
                                   "values cannot be Hounsfield units. Fix or re-export the file.")
    try:
        img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as e:
        why = str(e).strip().splitlines()[-1]
        hint = ("A NIfTI with a sheared or singular affine cannot be used; resample it to an "
                "orthogonal grid first." if "orthonormal" in why.lower() or "affine" in why.lower()
                or "direction" in why.lower() else
                "The file may be damaged; re-export it.")
        raise UnsupportedInput(f"SimpleITK cannot read {path} ({why}). {hint}") from e
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        img = sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])
    if img.GetDimension() == 2:
        img = sitk.JoinSeries(img)
    warnings = check_affine(img, path)
    n_z = img.GetSize()[2]
    slices = [[InstanceRef(file=str(path), frame=k)] for k in range(n_z)]
    return Volume(image=img, slices=slices, series=series, windowed=False, warnings=warnings)


def check_affine(img: sitk.Image, path: Path, tol: float = 1e-3) -> list[str]:
    """Warnings if SimpleITK's LPS geometry differs from nibabel's RAS affine (converted)."""
    nimg = _nib_header(path)
    theirs = np.asarray(nimg.affine, float)
    ours = ras_affine(img)
    if theirs.shape == (4, 4) and not np.allclose(ours, theirs, atol=tol):
        return [f"{path.name}: SimpleITK and nibabel disagree on the affine (qform vs sform?); "
                f"using SimpleITK's (LPS) {np.round(lps_affine(img), 4).tolist()}"]
    return []
