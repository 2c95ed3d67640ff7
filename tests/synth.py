"""Synthetic test inputs with known geometry: CT series, Enhanced CT, scouts, SR, PNG/JPG
slices, NIfTI volumes, zips, and a tree hash to prove an input was not modified.

Conventions (the same as SimpleITK and dicompipe):

- ``shape`` is ``(z, y, x)`` (slices, rows, columns);
- ``spacing`` is ``(x, y, z)`` in mm: column spacing, row spacing, slice step;
- ``origin`` is the LPS position (mm) of the first voxel of the first slice;
- ``direction`` is a 3×3 matrix (or SimpleITK's row-major 9-tuple) whose COLUMNS are the
  LPS directions of the x (row), y (column) and z (slice) axes.

``hu`` is a (z, y, x) array, or a callable ``f(x, y, z)`` of LPS coordinates in mm
(numpy arrays) returning HU, evaluated at every voxel centre — so a test can compare a
resampled volume with the truth in physical space.

Example::

    >>> from synth import write_ct_series, expected_geometry
    >>> files = write_ct_series(tmp_path / "ct", shape=(6, 16, 20), spacing=(0.7, 0.8, 2.5),
    ...                         shuffle=True, names="noext")
    >>> origin, spacing, direction = expected_geometry(origin=(0, 0, 0), spacing=(0.7, 0.8, 2.5))
"""
from __future__ import annotations

import hashlib
import random
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DEFAULT_HU_TRUTH = "sphere of 60 HU (radius 35% of the field) in -800 HU air-like background, plus a z ramp"

__all__ = [
    "phantom", "write_ct_series", "write_scout", "write_sr", "write_enhanced_ct",
    "write_png_slices", "write_nifti", "make_zip", "tree_hash", "expected_geometry",
    "voxel_lps", "write_secondary_capture", "png_slice_values", "transcode_gdcm",
]


# --------------------------------------------------------------------------- geometry
def _dir3(direction) -> np.ndarray:
    d = np.asarray(direction if direction is not None else np.eye(3), dtype=float)
    return d.reshape(3, 3)


def expected_geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), direction=None):
    """(origin, spacing, direction-9-tuple) as SimpleITK reports them for a synthetic series."""
    return (tuple(map(float, origin)), tuple(map(float, spacing)),
            tuple(float(v) for v in _dir3(direction).ravel()))


def voxel_lps(shape, origin, spacing, direction=None, tilt_deg: float = 0.0):
    """LPS coordinates (x, y, z arrays shaped ``shape``) of every voxel centre.

    With ``tilt_deg`` the image planes are rotated about the row (x) axis while the slice
    positions still step along the z axis — the geometry of a gantry-tilted CT acquisition.
    """
    nz, ny, nx = shape
    d = _dir3(direction)
    row, col, nrm = _plane_axes(d, tilt_deg)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    p = (np.asarray(origin, float)[:, None, None, None]
         + row[:, None, None, None] * (i * spacing[0])
         + col[:, None, None, None] * (j * spacing[1])
         + d[:, 2][:, None, None, None] * (k * spacing[2]))
    return p[0], p[1], p[2]


def _plane_axes(d: np.ndarray, tilt_deg: float):
    row, col, nrm = d[:, 0], d[:, 1], d[:, 2]
    if tilt_deg:
        t = np.deg2rad(tilt_deg)
        col, nrm = np.cos(t) * col + np.sin(t) * nrm, -np.sin(t) * col + np.cos(t) * nrm
    return row, col, nrm


def phantom(shape, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)) -> Callable:
    """A smooth HU function of LPS mm: a 60 HU sphere in a -800 HU background plus a z ramp."""
    nz, ny, nx = shape
    c = np.asarray(origin, float) + 0.5 * np.array([(nx - 1) * spacing[0], (ny - 1) * spacing[1],
                                                    (nz - 1) * spacing[2]])
    r = 0.35 * min(nx * spacing[0], ny * spacing[1])

    def f(x, y, z):
        inside = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r * r
        return np.where(inside, 60.0, -800.0) + 2.0 * (z - origin[2])
    return f


# --------------------------------------------------------------------------- DICOM
def _file_meta(sop_class, sop_uid, ts=ExplicitVRLittleEndian) -> FileMetaDataset:
    m = FileMetaDataset()
    m.MediaStorageSOPClassUID = sop_class
    m.MediaStorageSOPInstanceUID = sop_uid
    m.TransferSyntaxUID = ts
    m.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return m


def _patient_study(ds: Dataset, study_uid: str, patient_id: str = "SYNTH001") -> None:
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""


def _save(ds: Dataset, path: Path, ts) -> None:
    ds.file_meta.TransferSyntaxUID = ts
    if ts == pydicom.uid.ImplicitVRLittleEndian:
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    elif ts == pydicom.uid.ExplicitVRBigEndian:
        ds.save_as(path, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)


def _eval_hu(hu, shape, origin, spacing, direction, tilt_deg) -> np.ndarray:
    if hu is None:
        hu = phantom(shape, origin, spacing)
    if callable(hu):
        x, y, z = voxel_lps(shape, origin, spacing, direction, tilt_deg)
        hu = hu(x, y, z)
    hu = np.asarray(hu, dtype=float)
    if hu.shape != tuple(shape):
        raise ValueError(f"hu has shape {hu.shape}, expected {tuple(shape)}")
    return hu


def write_ct_series(folder, shape: Sequence[int] = (6, 16, 20),
                    spacing: Sequence[float] = (0.75, 0.8, 2.5),
                    origin: Sequence[float] = (-7.5, -6.0, 30.0), direction=None,
                    hu=None, tilt_deg: float = 0.0, *,
                    slope: float = 1.0, intercept: float = -1024.0,
                    rescale: Sequence[tuple[float, float]] | None = None,
                    dtype=np.int16, transfer_syntax=ExplicitVRLittleEndian,
                    study_uid: str | None = None, series_uid: str | None = None,
                    frame_of_reference_uid: str | None = None,
                    series_number: int = 1, description: str = "Synthetic CT",
                    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                    modality: str = "CT", body_part: str = "CHEST",
                    slice_thickness: float | None = None,
                    skip: Iterable[int] = (), duplicate: Iterable[int] = (),
                    instance_numbers: Sequence[int] | None = None,
                    names: str = "dcm", shuffle: bool = False, seed: int = 0,
                    empty_uids: bool = False, subfolder: str | None = None) -> list[Path]:
    """Write a CT series slice per file and return the paths in slice (z) order.

    ``skip``: z indices not written (a missing slice). ``duplicate``: z indices written twice
    (second copy with a new SOPInstanceUID, same position and pixels). ``rescale``: one
    (slope, intercept) per slice (overrides ``slope``/``intercept``). ``names``: "dcm"
    (``IM0001.dcm``), "noext" (``IM0001``), "uid" (SOPInstanceUID, no extension) or
    "random" (opaque names). ``shuffle`` writes in random order and makes InstanceNumber
    disagree with position. ``empty_uids`` blanks Study/Series/SOP UIDs and SOPClassUID in
    the data set (the file meta keeps them), like the abdomen-ct-dicom export.
    ``transfer_syntax``: any uncompressed syntax, deflate, or one pydicom can encode
    (RLE Lossless; JPEG 2000 lossless — the OpenJPEG encoder needs rows and columns ≥ 64;
    JPEG-LS needs pyjpegls, not a dependency: use :func:`transcode_gdcm` instead).

    Example::

        >>> files = write_ct_series(tmp_path, shape=(5, 8, 8), skip=[2], names="noext")
    """
    folder = Path(folder)
    if subfolder:
        folder = folder / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = shape
    d = _dir3(direction)
    row, col, _ = _plane_axes(d, tilt_deg)
    hu_arr = _eval_hu(hu, shape, origin, spacing, direction, tilt_deg)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    skip, duplicate = set(skip), set(duplicate)
    rng = random.Random(seed)
    ts = pydicom.uid.UID(transfer_syntax)
    info = np.iinfo(dtype)

    jobs = []
    for k in range(nz):
        if k in skip:
            continue
        jobs.extend([k] * (2 if k in duplicate else 1))
    order = list(range(len(jobs)))
    if shuffle:
        rng.shuffle(order)
    paths: list[Path | None] = [None] * len(jobs)
    numbers = list(range(1, len(jobs) + 1))
    if shuffle:
        rng.shuffle(numbers)
    for n_written, idx in enumerate(order):
        k = jobs[idx]
        s, b = rescale[k] if rescale is not None else (slope, intercept)
        stored = np.rint((hu_arr[k] - b) / s)
        if stored.min() < info.min or stored.max() > info.max:
            raise ValueError(f"slice {k}: HU do not fit {np.dtype(dtype).name} with slope {s}, intercept {b}")
        stored = stored.astype(dtype)
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(CTImageStorage, sop_uid, ts)
        _patient_study(ds, study_uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.BodyPartExamined = body_part
        ds.FrameOfReferenceUID = for_uid
        ds.InstanceNumber = instance_numbers[idx] if instance_numbers is not None else numbers[idx]
        ds.AcquisitionNumber = 1
        pos = np.asarray(origin, float) + d[:, 2] * (k * spacing[2])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{slice_thickness if slice_thickness is not None else spacing[2]:.6f}"
        ds.SliceLocation = f"{pos[2]:.6f}"
        ds.GantryDetectorTilt = f"{tilt_deg:.6f}"
        ds.KVP = "120"
        ds.RescaleSlope = f"{s:g}"
        ds.RescaleIntercept = f"{b:g}"
        ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 8 * np.dtype(dtype).itemsize
        ds.BitsStored = ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if np.issubdtype(dtype, np.signedinteger) else 0
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        if ts == pydicom.uid.ExplicitVRBigEndian:
            ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        else:
            ds.PixelData = stored.tobytes()
        if ts.is_compressed:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(ts, stored, generate_instance_uid=False)
        if empty_uids:
            for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
                setattr(ds, kw, "")
            ds.PatientID = ""
        name = {"dcm": f"IM{n_written + 1:04d}.dcm", "noext": f"IM{n_written + 1:04d}",
                "uid": sop_uid, "random": f"{rng.getrandbits(40):010x}"}[names]
        path = folder / name
        _save(ds, path, ts)
        paths[idx] = path
    return [p for p in paths if p is not None]


def write_scout(folder, study_uid: str | None = None, *, shape=(32, 48), spacing=(1.0, 1.0),
                name: str = "scout.dcm", series_number: int = 100,
                frame_of_reference_uid: str | None = None) -> Path:
    """A single coronal LOCALIZER CT image (ImageType ORIGINAL\\PRIMARY\\LOCALIZER)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop_uid)
    _patient_study(ds, study_uid)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Topogram"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.FrameOfReferenceUID = frame_of_reference_uid or generate_uid()
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-24.0, 0.0, 100.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SliceThickness = 1.0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.full(shape, 1000, np.int16).tobytes()
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_sr(folder, study_uid: str | None = None, *, name: str = "report.dcm") -> Path:
    """A minimal Basic Text SR (no pixel data) in the same study."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR, sop_uid)
    _patient_study(ds, study_uid or generate_uid())
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, sop_uid
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 200
    ds.SeriesDescription = "Radiologist report"
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = DicomSequence([code])
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced_ct(path, shape=(5, 12, 14), spacing=(0.7, 0.8, 2.0),
                      origin=(-5.0, -4.0, 10.0), direction=None, hu=None, *,
                      rescale: Sequence[tuple[float, float]] | None = None,
                      frame_order: Sequence[int] | None = None,
                      series_uid: str | None = None, series_number: int = 5) -> Path:
    """One Enhanced CT (multi-frame) file with per-frame Plane Position and Pixel Value
    Transformation functional groups and shared Plane Orientation / Pixel Measures.

    ``frame_order``: z index stored in each frame (default 0..z-1), to test sorting.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = shape
    d = _dir3(direction)
    hu_arr = _eval_hu(hu, shape, origin, spacing, direction, 0.0)
    order = list(frame_order) if frame_order is not None else list(range(nz))
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(EnhancedCTImageStorage, sop_uid)
    _patient_study(ds, generate_uid())
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, sop_uid
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Synthetic Enhanced CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [f"{v:.8f}" for v in (*d[:, 0], *d[:, 1])]
    pm = Dataset()
    pm.PixelSpacing = [spacing[1], spacing[0]]
    pm.SliceThickness = spacing[2]
    shared.PlaneOrientationSequence = DicomSequence([po])
    shared.PixelMeasuresSequence = DicomSequence([pm])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames, per = [], []
    for _f, k in enumerate(order):
        s, b = rescale[k] if rescale is not None else (1.0, -1024.0)
        frames.append(np.rint((hu_arr[k] - b) / s).astype(np.int16))
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin, float) + d[:, 2] * k * spacing[2]]
        fg.PlanePositionSequence = DicomSequence([pp])
        pv = Dataset()
        pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = f"{s:g}", f"{b:g}", "HU"
        fg.PixelValueTransformationSequence = DicomSequence([pv])
        fc = Dataset()
        fc.InStackPositionNumber = k + 1
        fg.FrameContentSequence = DicomSequence([fc])
        per.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_secondary_capture(folder, *, name: str = "sc.dcm", study_uid: str | None = None) -> Path:
    """A single 8-bit Secondary Capture image (a screenshot-like object, not a CT volume)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(SecondaryCaptureImageStorage, sop_uid)
    _patient_study(ds, study_uid or generate_uid())
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
    ds.Modality = "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 300
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def transcode_gdcm(paths: Iterable, transfer_syntax: str = "JPEGLosslessProcess14_1") -> list[Path]:
    """Re-encode DICOM files in place with GDCM (an encoder independent of pydicom), e.g.
    "JPEGLosslessProcess14_1" (JPEG lossless SV1, the common PACS export),
    "JPEGLosslessProcess14", "JPEGLSLossless", "JPEG2000Lossless", "RLELossless"."""
    import gdcm
    out = []
    for p in paths:
        p = Path(p)
        r = gdcm.ImageReader()
        r.SetFileName(str(p))
        if not r.Read():
            raise ValueError(f"GDCM cannot read {p}")
        c = gdcm.ImageChangeTransferSyntax()
        c.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, transfer_syntax)))
        c.SetInput(r.GetImage())
        if not c.Change():
            raise ValueError(f"GDCM cannot encode {p} as {transfer_syntax}")
        w = gdcm.ImageWriter()
        w.SetFileName(str(p))
        w.SetFile(r.GetFile())
        w.SetImage(c.GetOutput())
        if not w.Write():
            raise ValueError(f"GDCM cannot write {p}")
        out.append(p)
    return out


# --------------------------------------------------------------------------- images / NIfTI
def write_png_slices(folder, n: int = 4, shape=(24, 32), *, names: Sequence[str] | None = None,
                     ext: str = "png", rgb: bool = False, seed: int = 0) -> list[Path]:
    """8-bit slice images; slice k has a distinct pattern (value = (k*37 + y + x) % 256).

    ``names`` default to ``slice1 … sliceN`` (so natural sort differs from lexical sort
    once N ≥ 10). Returns the paths in slice order; ``(k*37 + y + x) % 256`` is the
    expected grey level of slice k (for RGB the three channels hold that same grey value).
    """
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else [f"slice{k + 1}" for k in range(n)]
    out = []
    for k, stem in enumerate(names):
        a = png_slice_values(k, shape)
        img = Image.fromarray(np.stack([a] * 3, -1) if rgb else a, "RGB" if rgb else "L")
        p = folder / f"{stem}.{ext}"
        img.save(p, quality=100) if ext.lower() in ("jpg", "jpeg") else img.save(p)
        out.append(p)
    return out


def png_slice_values(k: int, shape=(24, 32)) -> np.ndarray:
    """The uint8 values :func:`write_png_slices` puts in slice ``k``."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    return ((k * 37 + y + x) % 256).astype(np.uint8)


def write_nifti(path, hu: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=None, dtype=np.int16) -> Path:
    """Write a (z, y, x) array as NIfTI with nibabel from LPS geometry (converted to RAS).

    The affine is built independently of SimpleITK: RAS = diag(-1, -1, 1) · LPS.
    """
    import nibabel as nib
    d = _dir3(direction)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, float)[None, :]
    lps[:3, 3] = origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    data = np.asarray(hu).astype(dtype).transpose(2, 1, 0)     # (z, y, x) -> (i, j, k)
    img = nib.Nifti1Image(data, ras)
    img.set_qform(ras, code=1)
    img.set_sform(ras, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


# --------------------------------------------------------------------------- misc
def make_zip(folder, zip_path, *, extra: dict[str, bytes] | None = None, prefix: str = "") -> Path:
    """Zip every file under ``folder`` (names relative to it, under ``prefix``);
    ``extra`` adds raw members by name (e.g. ``{"../evil.txt": b"x"}``)."""
    folder, zip_path = Path(folder), Path(zip_path)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return zip_path


def tree_hash(path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself), plus mtimes — compare
    before and after a run to prove the input was not modified."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in files}


def chest_hu(n: int = 256, table: bool = True, fov: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU slice, true body mask, table mask): an elliptic chest (muscle wall, fat, two
    lungs, a soft-tissue mediastinum, noise) on a thick scanner table, in a FOV circle."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n] / n
    body = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.45) / 0.28) ** 2 < 1
    hu = np.full((n, n), -1000.0)
    hu[body] = -100.0                                                    # fat
    wall = ((xx - 0.5) / 0.35) ** 2 + ((yy - 0.45) / 0.25) ** 2 < 1
    hu[wall] = 50.0                                                      # muscle
    for cx in (0.33, 0.67):
        hu[((xx - cx) / 0.13) ** 2 + ((yy - 0.45) / 0.18) ** 2 < 1] = -850.0   # lungs
    hu += rng.normal(0, 15, hu.shape)
    tab = (yy > 0.78) & (yy < 0.86) & (np.abs(xx - 0.5) < 0.4)
    if table:
        hu[tab] = 200.0
    if fov:
        hu[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 > 0.49 ** 2] = -3024.0
    return hu.astype(np.float32), body, tab
