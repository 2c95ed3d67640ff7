"""Load a discovered DICOM series into a :class:`~dicompipe.types.Volume` (HU, LPS).

Slices are sorted along the slice normal (never by InstanceNumber), duplicates dropped,
gaps and irregular spacing resampled to a uniform grid (or refused above ``max_gap``),
gantry tilt corrected by resampling onto an orthogonal grid, and RescaleSlope/Intercept
applied per slice. Uncompressed little-endian pixels are read straight from the file
offsets found by ``discover`` (no second header parse); compressed ones are decoded by
pydicom's pixel backends (pylibjpeg-openjpeg, GDCM, pyjpegls, native RLE) in threads.

Example::

    >>> from dicompipe import io
    >>> vol = io.load(io.select(io.discover("export/")))
    >>> vol.image.GetSpacing(), vol.array.shape
"""
from __future__ import annotations

import math
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.pixels import pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicompipe.errors import UnreadableSeries
from dicompipe.io.dicom import POSITION_TOL_MM, normal_of, stack_geometry
from dicompipe.io.limits import BYTES_PER_VOXEL, check_budget
from dicompipe.types import InstanceRef, SeriesInfo, Volume
from dicompipe.util import cpu_count

#: relative deviation of one step from the mean step still treated as uniform spacing
UNIFORM_TOL = 0.01


def _workers(workers: int | None) -> int:
    return max(1, workers or min(4, cpu_count()))


def _stored_dtype(m: dict) -> np.dtype:
    bits = m.get("bits_allocated") or 16
    if bits not in (8, 16, 32):
        raise ValueError(f"BitsAllocated {bits}")
    return np.dtype(f"{'i' if m.get('pixel_representation') else 'u'}{bits // 8}").newbyteorder("<")


def _fast_ok(r: InstanceRef, nbytes: int) -> bool:
    m = r.meta
    return (m.get("pixel_offset") is not None and m.get("samples", 1) == 1
            and m.get("bits_allocated") in (8, 16, 32)
            and (m.get("pixel_length") or 0) >= nbytes * m.get("n_frames", 1))


def _fix_bits(a: np.ndarray, m: dict) -> None:
    """Apply BitsStored < BitsAllocated in place, as pydicom does (mask or sign-extend)."""
    stored, alloc = m.get("bits_stored"), m.get("bits_allocated")
    if not stored or not alloc or stored >= alloc:
        return
    shift = alloc - stored
    if m.get("pixel_representation"):
        np.left_shift(a, shift, out=a)
        np.right_shift(a, shift, out=a)
    else:
        np.bitwise_and(a, (1 << stored) - 1, out=a)


_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_J2K = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")


def _plugin(ts: str | None) -> str:
    """pydicom decoding plugin to force: openjpeg (pylibjpeg) for JPEG 2000, because GDCM
    aborts the whole process (an uncaught C++ exception) on a codestream whose component
    count contradicts the header; "" (pydicom's choice) otherwise."""
    if ts in _J2K:
        from pydicom.pixels import get_decoder
        try:
            if "pylibjpeg" in get_decoder(ts).available_plugins:
                return "pylibjpeg"
        except Exception:  # noqa: BLE001 - no decoder registered: let pydicom say so
            pass
    return ""


def _decode_file(file: str, ts: str | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """All frames of one file as stored values (frames, rows, cols), with pydicom's
    decoders, falling back to GDCM for compressed syntaxes that pydicom's plugins decline.

    Only 12-bit JPEG Extended falls back to GDCM: native pixel data that pydicom refuses is
    short or inconsistent (GDCM would return a buffer of uninitialised memory), and GDCM
    can abort the process on a damaged JPEG 2000 stream. The decoded frames must have the
    header's ``shape`` (rows, cols).
    """
    if ts == DeflatedExplicitVRLittleEndian:
        arr = pydicom.dcmread(file).pixel_array               # the deflated data set must be inflated
    else:
        try:                                                  # decodes without keeping the data set
            arr = pixel_array(file, decoding_plugin=_plugin(ts))
        except Exception:                                     # 12-bit JPEG Extended: pydicom's GDCM
            if ts != _JPEG_EXTENDED:                          # plugin refuses it, GDCM does not
                raise
            try:
                arr = gdcm_frames(file)
            except Exception as e:
                raise ValueError(f"neither pydicom nor GDCM can decode it ({e})") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"decoded pixel array has shape {arr.shape}, expected monochrome frames")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise ValueError(f"decoded frames are {arr.shape[1]} x {arr.shape[2]}, the header says "
                         f"{shape[0]} x {shape[1]}")
    return arr


def _read_each(refs: list[InstanceRef], put, workers: int | None) -> dict[int, str]:
    """Call ``put(i, stored_values)`` for every readable slice (from worker threads);
    return {index: why} for the slices that could not be read."""
    m0 = refs[0].meta
    rows, cols = m0["rows"], m0["cols"]
    dtype = _stored_dtype(m0)
    nbytes = rows * cols * dtype.itemsize
    failed: dict[int, str] = {}
    fast, slow = [], defaultdict(list)
    for i, r in enumerate(refs):
        if (r.meta.get("rows"), r.meta.get("cols")) != (rows, cols):
            failed[i] = f"matrix {r.meta.get('rows')}x{r.meta.get('cols')} differs from {rows}x{cols}"
        elif _fast_ok(r, nbytes) and _stored_dtype(r.meta) == dtype:
            fast.append(i)
        else:
            slow[r.file].append(i)
    local = threading.local()

    def read_fast(i):
        r = refs[i]
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty((rows, cols), dtype)
        try:
            with open(r.file, "rb") as f:
                f.seek(r.meta["pixel_offset"] + (r.frame or 0) * nbytes)
                got = f.readinto(memoryview(buf).cast("B"))
        except OSError as e:
            failed[i] = f"cannot read: {e.strerror or e}"
            return
        if got != nbytes:
            failed[i] = f"truncated pixel data ({got} of {nbytes} bytes)"
            return
        _fix_bits(buf, r.meta)
        put(i, buf)

    def read_slow(item):
        file, idx = item
        try:
            arr = _decode_file(file, refs[idx[0]].meta.get("ts"), (rows, cols))
            for i in idx:
                put(i, arr[refs[i].frame or 0])
        except Exception as e:  # any decoder failure is a per-file warning, not a crash
            for i in idx:
                failed[i] = f"cannot decode pixel data: {type(e).__name__}: {e}"[:300]

    n = _workers(workers) if len(refs) > 8 else 1
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(read_fast, fast))
        list(ex.map(read_slow, slow.items()))
    return failed


def read_pixels(refs: list[InstanceRef], workers: int | None = None):
    """Stored pixel values of ``refs`` as one (n, rows, cols) array, plus {index: error}
    for slices that could not be read (truncated or corrupt files).

    Example::

        >>> raw, failed = read_pixels(series.instances)
    """
    m0 = refs[0].meta
    out = np.zeros((len(refs), m0["rows"], m0["cols"]), _stored_dtype(m0))

    def put(i, a):
        out[i] = a
    return out, _read_each(refs, put, workers)


class _Buffer:
    """Numpy access to a SimpleITK image's own voxel buffer that keeps the image alive."""

    def __init__(self, image: sitk.Image, writable: bool):
        self.image = image
        iface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        iface["data"] = (iface["data"][0], not writable)
        self.__array_interface__ = iface


def writable_array(image: sitk.Image) -> np.ndarray:
    """A writable (z, y, x) numpy view of ``image``'s voxels (no copy). SimpleITK only
    offers read-only views; writing through this one fills an image we just created and
    own, which avoids a full-volume copy through ``GetImageFromArray``."""
    image.MakeUnique()
    return np.asarray(_Buffer(image, writable=True))


def read_hu(refs: list[InstanceRef], workers: int | None = None) -> tuple[sitk.Image, dict[int, str]]:
    """HU of ``refs`` (RescaleSlope/Intercept of each slice) decoded straight into a new
    float32 SimpleITK image (n, rows, cols) — one volume-sized allocation, no copies —
    plus {index: why} for unreadable slices (their planes are left at 0)."""
    m0 = refs[0].meta
    img = sitk.Image([int(m0["cols"]), int(m0["rows"]), len(refs)], sitk.sitkFloat32)
    out = writable_array(img)

    def put(i, a):
        s, b = refs[i].meta.get("slope", 1.0), refs[i].meta.get("intercept", 0.0)
        if s == 1.0 and float(np.float32(b)) == b and a.dtype.itemsize <= 2:
            np.add(a, np.float32(b), out=out[i], casting="unsafe")  # noqa: F821 (bound above; del-ed after use)
        else:
            out[i] = a * float(s) + float(b)  # noqa: F821  float64, rounded once
    failed = _read_each(refs, put, workers)
    del out
    return img, failed


def gdcm_frames(path) -> np.ndarray:
    """Stored values of every frame, decoded by GDCM directly: (frames, rows, cols).

    The fallback for syntaxes that pydicom's plugins decline (12-bit JPEG Extended).
    Monochrome only.
    """
    import gdcm
    r = gdcm.ImageReader()
    r.SetFileName(str(path))
    if not r.Read():
        raise ValueError(f"GDCM cannot read {path}")
    img = r.GetImage()
    pf = img.GetPixelFormat()
    if pf.GetSamplesPerPixel() != 1:
        raise ValueError("GDCM fallback handles monochrome images only")
    types = {gdcm.PixelFormat.UINT8: np.uint8, gdcm.PixelFormat.INT8: np.int8,
             gdcm.PixelFormat.UINT16: np.uint16, gdcm.PixelFormat.INT16: np.int16,
             gdcm.PixelFormat.UINT32: np.uint32, gdcm.PixelFormat.INT32: np.int32}
    dtype = types.get(pf.GetScalarType())
    if dtype is None:
        raise ValueError(f"GDCM pixel type {pf.GetScalarTypeAsString()} not supported")
    dims = [img.GetDimension(i) for i in range(img.GetNumberOfDimensions())]
    frames = dims[2] if len(dims) > 2 else 1
    buf = img.GetBuffer().encode("utf-8", "surrogateescape")
    return np.frombuffer(buf, dtype).reshape(frames, dims[1], dims[0])


def load_dicom(series: SeriesInfo, *, max_gap: float | None = None,
               correct_tilt: bool = True, workers: int | None = None,
               max_memory=None) -> Volume:
    """Load a DICOM :class:`SeriesInfo` (see module docstring).

    ``max_gap``: largest allowed gap between slices in mm before the series is refused
    (default: 3 × the nominal spacing, the median of the smallest steps); smaller gaps and
    irregular spacing are resampled to a uniform grid by linear interpolation along the
    stack (numpy, between the two neighbouring slices). ``correct_tilt``: resample a
    gantry-tilted (sheared) stack onto an orthogonal grid (False keeps the slices and
    reports the tilt; the geometry is then that of the untilted planes). ``max_memory``:
    the memory budget (see :mod:`dicompipe.io.limits`), checked before the volume is allocated.
    """
    refs = list(series.instances)
    if not refs:
        raise UnreadableSeries(f"Series {series.key} has no instances to load.")
    if not series.usable:
        raise UnreadableSeries(
            f"Series {series.key} ({series.series_description or series.modality or 'no description'}) "
            f"is not a loadable volume: {series.unusable_reason}. Choose another series "
            "(see `dicompipe series PATH`).")
    warnings: list[str] = []
    m0 = refs[0].meta
    geometric = m0.get("iop") is not None and all(r.position is not None for r in refs)
    if geometric:
        g = stack_geometry(refs)
        refs = [refs[i] for i in g["order"]]
        t = g["t"]
        keep, dropped = [0], []
        for i in range(1, len(refs)):
            if t[i] - t[keep[-1]] <= POSITION_TOL_MM:
                dropped.append(i)
            else:
                keep.append(i)
        if dropped:
            names = ", ".join(os.path.basename(refs[i].file) + (f"#{refs[i].frame}" if refs[i].frame else "")
                              for i in dropped[:5])
            warnings.append(f"dropped {len(dropped)} instance(s) duplicating a slice position: {names}"
                            + (" ..." if len(dropped) > 5 else ""))
        refs, t = [refs[i] for i in keep], t[keep]
    else:
        g, t = None, np.zeros(len(refs))

    check_budget(len(refs) * (m0.get("rows") or 0) * (m0.get("cols") or 0) * BYTES_PER_VOXEL,
                 f"series {series.key} ({len(refs)} slices of {m0.get('rows')} x {m0.get('cols')}, "
                 f"first {refs[0].file})", max_memory)
    try:
        img: sitk.Image | None
        img, failed = read_hu(refs, workers)
    except ValueError as e:                              # e.g. BitsAllocated 1 or 12
        raise UnreadableSeries(f"Series {series.key} ({refs[0].file}): unsupported pixel layout "
                               f"({e}); dicompipe reads 8, 16 and 32-bit monochrome images.") from e
    arr = None
    if failed:
        for i, why in sorted(failed.items())[:5]:
            warnings.append(f"skipped slice {refs[i].file}: {why}")
        if len(failed) > 5:
            warnings.append(f"... and {len(failed) - 5} more unreadable slice(s)")
        ok = [i for i in range(len(refs)) if i not in failed]
        if not ok:
            raise UnreadableSeries(
                f"No slice of series {series.key} could be decoded (first: {refs[0].file}: "
                f"{failed[0]}). Check that the files are complete and that the codec "
                "packages (pylibjpeg-openjpeg, python-gdcm) are installed.")
        arr = np.ascontiguousarray(sitk.GetArrayViewFromImage(img)[ok])
        img, refs, t = None, [refs[i] for i in ok], t[ok]
    slices = [[r] for r in refs]

    ps = m0.get("spacing") or (1.0, 1.0)
    if not m0.get("spacing"):
        warnings.append("no PixelSpacing: assuming 1 mm pixels")
    if geometric:
        iop = m0["iop"]
        row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
        assert g is not None                    # geometric: stack_geometry ran
        n, axis = normal_of(iop), g["axis"]
        origin = np.asarray(refs[0].position, float)
    else:
        row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        n = axis = np.array([0, 0, 1.0])
        origin = np.asarray(refs[0].position or (0.0, 0.0, 0.0), float)
        if len(refs) > 1:
            warnings.append("no ImagePositionPatient/ImageOrientationPatient: slices stacked in file order")

    if len(refs) > 1 and geometric:
        steps = np.diff(t)
        step = float((t[-1] - t[0]) / (len(t) - 1))
        if np.max(np.abs(steps - step)) > max(UNIFORM_TOL * step, POSITION_TOL_MM):
            if arr is None:
                assert img is not None               # arr is None only while img holds the slices
                arr = sitk.GetArrayFromImage(img)
                img = None
            arr, slices, step, msg = _regularise(arr, refs, t, max_gap, series)
            warnings.append(msg)
    else:
        step = m0.get("thickness") or 1.0
        if len(refs) == 1:
            warnings.append(f"single slice: z spacing set to SliceThickness ({step:g} mm)")

    if img is None:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr, np.float32))
        del arr
    tilt = g["tilt_deg"] if g else 0.0
    dn = step * float(axis @ n)
    img.SetOrigin(tuple(map(float, origin)))
    img.SetSpacing((float(ps[1]), float(ps[0]), float(dn if tilt else step)))
    img.SetDirection(tuple(float(v) for v in np.column_stack([row, col, n]).ravel()))
    if tilt:
        if correct_tilt:
            img, slices = _untilt(img, slices, origin, step * axis, n, dn, axis, row, max_memory)
            warnings.append(f"gantry tilt {tilt:.2f} deg corrected: resampled onto an orthogonal grid "
                            f"({img.GetSize()[0]}x{img.GetSize()[1]} in-plane, linear interpolation)")
        else:
            warnings.append(f"gantry tilt {tilt:.2f} deg NOT corrected: geometry is that of the "
                            "tilted planes stacked along their normal")
    return Volume(image=img, slices=slices, series=series, windowed=False, warnings=warnings)


def _regularise(arr, refs, t, max_gap, series):
    """Resample slices at irregular positions ``t`` (mm along the stack) to a uniform step."""
    steps = np.diff(t)
    # nominal spacing: the median of the smallest steps (robust when many slices are missing)
    med = float(np.median(steps[steps <= 1.5 * steps.min()]))
    limit = max_gap if max_gap is not None else 3.0 * med
    j = int(np.argmax(steps))
    if steps[j] > limit + POSITION_TOL_MM:
        raise UnreadableSeries(
            f"Series {series.key}: gap of {steps[j]:.2f} mm between {refs[j].file} and "
            f"{refs[j + 1].file} (nominal spacing {med:.2f} mm) exceeds the allowed {limit:.2f} mm. "
            "Slices are missing from the export: re-export the full series, or pass a larger "
            "max_gap to resample across the gap.")
    span = float(t[-1] - t[0])
    nz = int(round(span / med)) + 1
    step = span / (nz - 1)
    out = np.empty((nz,) + arr.shape[1:], np.float32)
    slices = []
    resampled = 0
    for k in range(nz):
        tau = t[0] + k * step
        i = int(np.searchsorted(t, tau - POSITION_TOL_MM))
        i = min(i, len(t) - 1)
        if abs(t[i] - tau) <= max(POSITION_TOL_MM, 1e-3 * step):
            out[k] = arr[i]
            slices.append([refs[i]])
            continue
        a = max(i - 1, 0)
        w = (tau - t[a]) / (t[i] - t[a])
        out[k] = (1.0 - w) * arr[a] + w * arr[i]
        slices.append([refs[a], refs[i]])
        resampled += 1
    msg = (f"irregular slice spacing ({steps.min():.3f}..{steps.max():.3f} mm, largest gap "
           f"{steps.max():.3f} mm between {os.path.basename(refs[j].file)} and "
           f"{os.path.basename(refs[j + 1].file)}): resampled to a uniform {step:.4f} mm grid, "
           f"{resampled} of {nz} slices interpolated linearly")
    return out, slices, step, msg


def _untilt(img: sitk.Image, slices, p0, step_vec, n, dn, axis, row, max_memory=None):
    """Resample a sheared (gantry-tilted) stack onto an orthogonal grid.

    ``img`` carries the untilted geometry (planes stacked along their normal ``n`` every
    ``dn`` mm); the true slice k lies ``k * (step_vec - dn n)`` further. The output grid has
    its z axis along the table (``axis``), the row direction kept, and covers every voxel
    (so it has more slices than the input). Returns (image, slices) where ``slices[z]``
    names the source slice(s) whose tilted planes pass through the centre of output slice
    z (the nearer first; empty when the centre lies outside the acquired stack).
    """
    shear = np.asarray(step_vec, float) - dn * np.asarray(n, float)
    # output physical point x -> point of the untilted image: x - ((x - p0)·n / dn) * shear
    A = np.eye(3) - np.outer(shear, n) / dn
    b = (np.asarray(p0, float) @ n) / dn * shear
    tf = sitk.AffineTransform(3)
    tf.SetMatrix(tuple(A.ravel()))
    tf.SetTranslation(tuple(b))
    u3 = np.asarray(axis, float)
    u1 = np.asarray(row, float) - (row @ u3) * u3
    u1 /= np.linalg.norm(u1)
    u2 = np.cross(u3, u1)
    sx, sy, _ = img.GetSpacing()
    nx, ny, nz = img.GetSize()
    step = float(np.linalg.norm(step_vec))
    corners = []
    for i in (0, nx - 1):
        for j in (0, ny - 1):
            for k in (0, nz - 1):
                p = img.TransformContinuousIndexToPhysicalPoint((float(i), float(j), float(k)))
                corners.append(np.asarray(p) + k * shear)
    rel = (np.asarray(corners) - p0) @ np.column_stack([u1, u2, u3])
    lo, hi = rel.min(0), rel.max(0)
    spacing = (sx, sy, step)
    size = [int(math.floor((hi[a] - lo[a]) / spacing[a] + 1e-6)) + 1 for a in range(3)]
    origin = np.asarray(p0, float) + lo[0] * u1 + lo[1] * u2 + lo[2] * u3
    check_budget(int(np.prod(size, dtype=float)) * BYTES_PER_VOXEL,
                 f"the tilt-corrected grid {size[0]} x {size[1]} x {size[2]}", max_memory)
    fill = float(sitk.GetArrayViewFromImage(img).min())
    out = sitk.Resample(img, size, tf, sitk.sitkLinear, tuple(origin), spacing,
                        tuple(np.column_stack([u1, u2, u3]).ravel()), fill, sitk.sitkFloat32)
    out_slices: list[list[InstanceRef]] = []
    for z in range(size[2]):
        centre = out.TransformContinuousIndexToPhysicalPoint(
            ((size[0] - 1) / 2.0, (size[1] - 1) / 2.0, float(z)))
        kc = img.TransformPhysicalPointToContinuousIndex(tf.TransformPoint(centre))[2]
        if kc < -0.5 or kc > nz - 0.5:
            out_slices.append([])
            continue
        lo, hi = int(math.floor(kc)), int(math.ceil(kc))
        near = [k for k in sorted({lo, hi}, key=lambda k: abs(k - kc)) if 0 <= k < nz]
        if abs(kc - round(kc)) < 1e-3:
            near = near[:1]
        out_slices.append([r for k in near for r in slices[k]])
    return out, out_slices
