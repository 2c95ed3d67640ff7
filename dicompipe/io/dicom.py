"""DICOM headers: read each file once (no pixels), group instances into candidate volumes.

Every per-instance fact that loading needs (orientation, rescale, pixel layout, the byte
offset of uncompressed pixel data...) is kept in ``InstanceRef.meta`` so that
:func:`dicompipe.io.load` never parses a header again.

Example::

    >>> from dicompipe.io.dicom import read_headers, group_series
    >>> refs, skipped = read_headers(["a.dcm", "b.dcm"])
    >>> series = group_series(refs, source="export/")
"""
from __future__ import annotations

import math
import os
import struct
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicompipe.io.headerscan import scan_header
from dicompipe.types import InstanceRef, SeriesInfo

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
_TILT_MIN_DEG = 0.01          # below this a shear between slices is rounding, not tilt
_OBLIQUE_DEG = 10.0           # further than this from every patient axis: "oblique"
POSITION_TOL_MM = 1e-3        # positions closer than this along the normal are duplicates
_FAST_HEADERS = True          # headerscan first, pydicom for what it declines (tests toggle it)


#: plain documentation that travels with exports and examples: listed, never warned about
DOC_NAMES = {"readme", "license", "licence", "attribution", "copying", "notice", "authors"}
DOC_SUFFIXES = {".txt", ".md", ".rst", ".xml", ".json", ".html", ".pdf"}


def is_document(path) -> bool:
    """``README``, ``LICENSE``, ``ATTRIBUTION``, ``*.txt``, ``*.md``, ``*.xml``, ``*.json`` …

    >>> is_document("examples/lidc-idri-0001/ATTRIBUTION"), is_document("x/1.dcm")
    (True, False)
    """
    p = Path(path)
    return p.stem.lower() in DOC_NAMES or p.suffix.lower() in DOC_SUFFIXES


class Skipped:
    """Counts and names of files that were not used, for messages. Documentation files
    (:func:`is_document`) are kept apart in ``documents`` and are not a warning."""

    def __init__(self):
        self.not_dicom: list[str] = []
        self.unreadable: list[tuple[str, str]] = []      # (file, why)
        self.dicomdir: list[str] = []

    def merge(self, other: Skipped) -> None:
        self.not_dicom += other.not_dicom
        self.unreadable += other.unreadable
        self.dicomdir += other.dicomdir

    @property
    def documents(self) -> list[str]:
        return [f for f in self.not_dicom if is_document(f)]

    @property
    def other_files(self) -> list[str]:
        """Skipped files that are neither DICOM nor documentation."""
        return [f for f in self.not_dicom if not is_document(f)]

    def summary(self) -> str:
        parts = []
        if self.other_files:
            parts.append(f"{len(self.other_files)} non-DICOM file(s) skipped")
        if self.unreadable:
            f, why = self.unreadable[0]
            more = f" and {len(self.unreadable) - 1} more" if len(self.unreadable) > 1 else ""
            parts.append(f"{len(self.unreadable)} unreadable DICOM file(s) skipped ({f}: {why}{more})")
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading
def _looks_like_dicom_without_preamble(path: Path) -> bool:
    """True for a raw data set without the 128-byte preamble (old ACR-NEMA style files)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    for order in "<>":                                  # little or big endian data set
        group, elem = struct.unpack(order + "HH", head[:4])
        if group in (0x0002, 0x0008) and elem < 0x0100 and (
                head[4:6].isalpha() or struct.unpack(order + "I", head[4:8])[0] < 0x10000):
            return True
    return False


def _str(v) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _floats(v, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _num(v, default=None):
    try:
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _int(v, default=None):
    try:
        return int(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _pixel_element(fp, ts: str) -> tuple[int | None, int | None]:
    """(value offset, value length) of Pixel Data at the file position after a
    ``stop_before_pixels`` read, for native little-endian files; (None, None) otherwise."""
    start = fp.tell()
    head = fp.read(12)
    if len(head) < 8 or head[:4] != _PIXEL_TAG_LE:
        return None, None
    if ts == ImplicitVRLittleEndian:
        return start + 8, struct.unpack("<I", head[4:8])[0]
    if len(head) < 12 or head[4:6] not in (b"OW", b"OB"):
        return None, None
    return start + 12, struct.unpack("<I", head[8:12])[0]


class _Values:
    """Converted header values, memoised on the raw bytes: the many values that repeat
    across a series (UIDs, orientation, spacing, matrix...) are converted by pydicom once
    per discover() call instead of once per file. The per-instance ASCII values (UI, IS,
    DS: SOPInstanceUID, InstanceNumber, ImagePositionPatient...) are split and parsed
    straight from their bytes, with pydicom's conversion as the fallback for anything
    unusual."""

    def __init__(self):
        self.cache: dict = {}

    def reader(self, ds):
        cs = ds.get_item(0x00080005)
        charset = cs.value if cs is not None else None
        if not isinstance(charset, (bytes, str, type(None))):
            charset = str(charset)                     # a converted multi-valued charset

        def get(keyword: str, fn=lambda v: v, default=None):
            tag = _TAGS[keyword]
            elem = ds.get_item(tag)
            if elem is None:
                return default
            if isinstance(elem, RawDataElement) and elem.VR != "SQ" and isinstance(elem.value, bytes):
                key = (tag, elem.value, elem.is_little_endian, elem.is_implicit_VR, charset)
                try:
                    v = self.cache[key]
                except KeyError:
                    v = _fast_ascii(keyword, elem.value, fn)
                    if v is _NO:
                        v = fn(ds[tag].value)
                    if len(self.cache) < 100_000:
                        self.cache[key] = v
                return v if v is not None else default
            v = fn(ds[tag].value)
            return v if v is not None else default
        return get


_NO = object()
_ASCII_VR = {"SOPInstanceUID": "UI", "InstanceNumber": "IS", "ImagePositionPatient": "DS",
             "RescaleSlope": "DS", "RescaleIntercept": "DS", "AcquisitionNumber": "IS",
             "SliceThickness": "DS"}


def _fast_ascii(keyword: str, raw: bytes | None, fn):
    """Value of a UI/IS/DS element from its raw bytes, or ``_NO`` to let pydicom convert."""
    vr = _ASCII_VR.get(keyword)
    if vr is None or raw is None:
        return _NO
    try:
        parts = raw.decode("ascii").strip(" \x00").split("\\")
        if vr == "UI":
            return fn(parts[0].strip(" \x00")) if len(parts) == 1 else _NO
        vals = [float(x) if vr == "DS" else int(x) for x in parts]
    except (UnicodeDecodeError, ValueError):
        return _NO
    return fn(vals if len(vals) > 1 else vals[0])


_TAGS = {kw: pydicom.datadict.tag_for_keyword(kw) for kw in (
    "SOPClassUID", "SOPInstanceUID", "ImageType", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "PatientID", "PatientName", "StudyDate", "GantryDetectorTilt", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "AcquisitionNumber", "SliceThickness", "NumberOfFrames",
    "InstanceNumber", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
    "RescaleIntercept", "ImagePositionPatient", "SpacingBetweenSlices")}


def read_header(path, keep: object = None, values: _Values | None = None
                ) -> tuple[list[InstanceRef], dict] | None:
    """Read one file's header (no pixels). Returns (instance refs, series facts) or None when
    the file is not DICOM. A multi-frame file gives one ref per frame. Raises
    ``InvalidDicomError``/``OSError``/``ValueError`` for a damaged DICOM file.

    ``keep`` is stored in every ref's meta (it keeps a temporary extraction folder alive);
    ``values`` shares converted header values between the files of one discover() call.
    """
    path = str(path)
    with open_regular(path) as fp:
        size = os.fstat(fp.fileno()).st_size
        fast = scan_header(fp) if _FAST_HEADERS else None
        if fast is not None:
            ds, ts, offset, length = fast
            fm = ds.file_meta
        else:
            fp.seek(0)
            slow = _pydicom_header(path, fp)
            if slow is None:
                return None
            ds, fm, ts, offset, length = slow
    return _describe_header(path, ds, fm, ts, offset, length, keep, values, size)


def open_regular(path):
    """Open ``path`` for binary reading, refusing (``OSError``) anything but a regular file:
    a FIFO or device swapped in after the folder was listed must not block the reader."""
    import stat
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file (FIFO, socket or device); not read")
    return os.fdopen(fd, "rb")


def _pydicom_header(path: str, fp):
    """(data set, file meta, transfer syntax, pixel offset, pixel length) read by pydicom,
    or None when the file is not DICOM."""
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError:
        if not _looks_like_dicom_without_preamble(Path(path)):
            return None
        fp.seek(0)
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
    fm = getattr(ds, "file_meta", None)
    ts = _meta(fm, 0x00020010) or ""
    if not ts:
        implicit, little = ds.original_encoding
        ts = (ImplicitVRLittleEndian if implicit else
              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if len(ds) == 0:
        raise ValueError("no data set after the file meta (truncated or empty file)")
    offset = length = None
    if ts in _NATIVE_LE:
        at = fp.tell()
        offset, length = _pixel_element(fp, ts)
        if offset is None and _ROWS in ds and fp.seek(0, 2) <= at + 8:
            raise ValueError("the file ends before its Pixel Data (truncated)")
    return ds, fm, ts, offset, length


def _describe_header(path, ds, fm, ts, offset, length, keep, values, size=None):
    get = (values or _Values()).reader(ds)
    sop_class = get("SOPClassUID", _str) or _meta(fm, 0x00020002)
    if sop_class == DICOMDIR_CLASS or 0x00041220 in ds:              # DirectoryRecordSequence
        return [], {"dicomdir": True}
    if sop_class is None and _ROWS not in ds and 0x00080060 not in ds:
        return None                                    # forced read of something that is not DICOM
    sop_uid = get("SOPInstanceUID", _str) or _meta(fm, 0x00020003)
    image_type = get("ImageType", lambda v: tuple(str(x).upper() for x in (
        [v] if isinstance(v, str) else (v or [])) if str(x)), ())
    facts = {
        "study_instance_uid": get("StudyInstanceUID", _str),
        "series_instance_uid": get("SeriesInstanceUID", _str),
        "frame_of_reference_uid": get("FrameOfReferenceUID", _str),
        "sop_class_uid": sop_class,
        "modality": get("Modality", _str),
        "series_number": get("SeriesNumber", _int),
        "series_description": get("SeriesDescription", _str),
        "image_type": image_type,
        "body_part": get("BodyPartExamined", _str),
        "patient_id": get("PatientID", _str),
        "patient_name": get("PatientName", _str),
        "study_date": get("StudyDate", _str),
        "gantry_tilt_tag": get("GantryDetectorTilt", _num, 0.0),
        "transfer_syntax": str(ts),
        "has_pixels": offset is not None or _has_pixel_data(path, ds, ts),
        "folder": os.path.dirname(path),
    }
    base = {
        "ts": str(ts),
        "rows": get("Rows", _int), "cols": get("Columns", _int),
        "bits_allocated": get("BitsAllocated", _int), "bits_stored": get("BitsStored", _int),
        "pixel_representation": get("PixelRepresentation", _int, 0),
        "samples": get("SamplesPerPixel", _int, 1),
        "photometric": get("PhotometricInterpretation", _str),
        "pixel_offset": offset, "pixel_length": length,
        "acquisition": get("AcquisitionNumber", _int),
        "image_type": image_type,
        "thickness": get("SliceThickness", _num),
        "n_frames": get("NumberOfFrames", _int, 1) or 1,
    }
    check_layout(base, size)
    if not (base["rows"] and base["cols"]):
        base["n_frames"] = 1    # no image: NumberOfFrames means nothing (and may be hostile)
    base["thickness"] = _positive(base["thickness"])
    if keep is not None:
        base["keep"] = keep
    inst_no = get("InstanceNumber", _int)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        refs = _enhanced_refs(ds, path, sop_uid, inst_no, base)
    else:
        meta = dict(base,
                    iop=get("ImageOrientationPatient", lambda v: _floats(v, 6)),
                    spacing=get("PixelSpacing", lambda v: _floats(v, 2)),
                    slope=get("RescaleSlope", _num, 1.0),
                    intercept=get("RescaleIntercept", _num, 0.0))
        pos = get("ImagePositionPatient", lambda v: _floats(v, 3))
        if base["n_frames"] > 1:
            # legacy multi-frame (no functional groups): frames stacked along the normal
            step = get("SpacingBetweenSlices", _num) or base["thickness"]
            refs = []
            for f in range(base["n_frames"]):
                p = _legacy_frame_position(pos, meta["iop"], step, f)
                refs.append(InstanceRef(str(path), sop_uid, inst_no, frame=f, position=p, meta=meta))
        else:
            refs = [InstanceRef(str(path), sop_uid, inst_no, position=pos, meta=meta)]
    for r in refs:
        check_geometry(r)
    return refs, facts


# --------------------------------------------------------------------------- validation
#: plausibility bounds: beyond them a value is hostile or corrupt, and float32 HU would overflow
MAX_COORD_MM = 1e7
MAX_SPACING_MM = 1e4
MAX_SLOPE = 1e6
MAX_INTERCEPT = 1e7


def _positive(v):
    """A finite positive number, else None (SliceThickness is informative only)."""
    return v if v is not None and math.isfinite(v) and v > 0 else None


def frame_bytes(m: dict) -> int:
    """Bytes of one stored frame: Rows × Columns × SamplesPerPixel × BitsAllocated / 8."""
    bits = m.get("bits_allocated") or 0
    return ((m.get("rows") or 0) * (m.get("cols") or 0) * (m.get("samples") or 1) * bits + 7) // 8


def check_layout(m: dict, file_size: int | None) -> None:
    """Refuse a header whose pixel layout cannot match the bytes in the file.

    Raises ``ValueError`` (the file is then skipped and counted) when BitsAllocated or
    NumberOfFrames is invalid, or when Rows × Columns × frames × BitsAllocated/8 needs
    more bytes than the Pixel Data element (native syntaxes) or the file holds, so a
    hostile header can neither make the loader allocate gigabytes nor read past the data.

    Example::

        >>> check_layout({"rows": 512, "cols": 512, "bits_allocated": 16, "n_frames": 1,
        ...               "ts": "1.2.840.10008.1.2.1", "pixel_length": 1000}, 2000)
        Traceback (most recent call last):
        ValueError: Pixel Data holds 1000 bytes but 512 x 512 x 1 frame(s) x 16 bits need 524288 ...
    """
    rows, cols, bits, frames = m.get("rows"), m.get("cols"), m.get("bits_allocated"), m.get("n_frames")
    if not rows or not cols:
        return                                     # no image: described as a non-image object
    if rows < 0 or cols < 0 or rows > 65535 or cols > 65535:
        raise ValueError(f"Rows x Columns {rows} x {cols} is invalid")
    if bits is None or bits <= 0 or bits > 64:
        raise ValueError(f"BitsAllocated {bits} is invalid (CT images use 8, 16 or 32): "
                         "the header is corrupt")
    if frames is None or frames < 1:
        raise ValueError(f"NumberOfFrames {frames} is invalid")
    need = frames * frame_bytes(m)
    length = m.get("pixel_length")
    ts = UID(m.get("ts") or "")
    what = f"{rows} x {cols} x {frames} frame(s) x {bits} bits"
    if length is not None and length != 0xFFFFFFFF and length < need:
        raise ValueError(f"Pixel Data holds {length} bytes but {what} need {need} bytes: "
                         "the header does not match the pixel data (corrupt or hostile file)")
    if file_size is None:
        return
    if ts.is_encapsulated if ts.is_valid else False:
        if frames > max(1, file_size // 8):          # every compressed frame has an 8-byte item
            raise ValueError(f"NumberOfFrames {frames} is impossible in a file of {file_size} bytes")
    elif (ts.is_deflated if ts.is_valid else False) and need > 1100 * file_size:
        raise ValueError(f"{what} need {need} bytes, more than deflate can hold in "
                         f"{file_size} bytes: corrupt or hostile file")
    elif not (ts.is_deflated if ts.is_valid else False) and need > file_size:
        raise ValueError(f"{what} need {need} bytes but the file holds {file_size}: "
                         "the header does not match the pixel data (corrupt or hostile file)")


def _finite(name: str, v, bound: float) -> None:
    vals = v if isinstance(v, tuple) else (v,)
    if not all(math.isfinite(x) and abs(x) <= bound for x in vals):
        raise ValueError(f"{name} {v} is not a finite, plausible value")


def check_geometry(r: InstanceRef) -> None:
    """Refuse NaN/inf/implausible position, orientation, pixel spacing or rescale, zero or
    negative pixel spacing, a zero slope and a degenerate orientation (row ∥ column).
    Raises ``ValueError`` naming the attribute (the file is skipped and counted)."""
    m = r.meta
    if r.position is not None:
        _finite("ImagePositionPatient", r.position, MAX_COORD_MM)
    if m.get("iop") is not None:
        _finite("ImageOrientationPatient", m["iop"], 2.0)
        row, col = np.asarray(m["iop"][:3]), np.asarray(m["iop"][3:])
        if np.linalg.norm(np.cross(row, col)) < 0.5 or min(np.linalg.norm(row), np.linalg.norm(col)) < 0.5:
            raise ValueError(f"ImageOrientationPatient {m['iop']} is degenerate: the row and column "
                             "directions must be perpendicular unit vectors")
    if m.get("spacing") is not None:
        _finite("PixelSpacing", m["spacing"], MAX_SPACING_MM)
        if min(m["spacing"]) <= 0:
            raise ValueError(f"PixelSpacing {m['spacing']} must be positive")
    for name, key, bound in (("RescaleSlope", "slope", MAX_SLOPE),
                             ("RescaleIntercept", "intercept", MAX_INTERCEPT)):
        if m.get(key) is not None:
            if not isinstance(m[key], (int, float)):
                raise ValueError(f"{name} {m[key]!r} is not a number")
            _finite(name, float(m[key]), bound)
    if m.get("slope") == 0:
        raise ValueError("RescaleSlope 0 would make every pixel the same value")


def _meta(fm, tag: int) -> str | None:
    """A (string) file meta value, without keyword lookups."""
    if fm is None:
        return None
    e = fm.get_item(tag)
    return _str(fm[tag].value) if e is not None else None


_ROWS = 0x00280010


def _has_pixel_data(path, ds, ts) -> bool:
    """Pixel presence for non-native syntaxes (the header-only read stopped before it)."""
    return "Rows" in ds and "Columns" in ds and (
        ds.get("BitsAllocated") is not None or "NumberOfFrames" in ds)


def _legacy_frame_position(pos, iop, step, f):
    if pos is None or iop is None or not step:
        return pos if f == 0 else None
    n = np.cross(iop[:3], iop[3:])
    return tuple(float(v) for v in np.asarray(pos) + f * step * n)


def _enhanced_refs(ds, path: Path, sop_uid, inst_no, base) -> list[InstanceRef]:
    """One ref per frame of an Enhanced (multi-frame) image from its functional groups."""
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per = ds.get("PerFrameFunctionalGroupsSequence") or []

    def item(fg, seq):
        for g in (fg, shared):
            if g is not None and seq in g and len(g[seq].value):
                return g[seq].value[0]
        return None

    refs = []
    for f in range(base["n_frames"]):
        fg = per[f] if f < len(per) else None
        po = item(fg, "PlaneOrientationSequence")
        pp = item(fg, "PlanePositionSequence")
        pm = item(fg, "PixelMeasuresSequence")
        pv = item(fg, "PixelValueTransformationSequence")
        meta = dict(base,
                    iop=_floats(po.get("ImageOrientationPatient"), 6) if po else None,
                    spacing=_floats(pm.get("PixelSpacing"), 2) if pm else None,
                    slope=_num(pv.get("RescaleSlope"), 1.0) if pv else _num(ds.get("RescaleSlope"), 1.0),
                    intercept=(_num(pv.get("RescaleIntercept"), 0.0) if pv
                               else _num(ds.get("RescaleIntercept"), 0.0)))
        if pm is not None and pm.get("SliceThickness") is not None:
            meta["thickness"] = _num(pm.get("SliceThickness"))
        pos = _floats(pp.get("ImagePositionPatient"), 3) if pp else None
        refs.append(InstanceRef(str(path), sop_uid, inst_no, frame=f,
                                position=cast("tuple[float, float, float] | None", pos), meta=meta))
    return refs


def _why(e: Exception) -> str:
    """Short reason for a skipped file, e.g. ``ValueError: BitsAllocated 0 is invalid``."""
    return f"{type(e).__name__}: {e}"[:200]


def read_headers(files: Iterable, keep: object = None):
    """Read every file's header. Returns ([(refs, facts)], Skipped, dicomdir files)."""
    found, skipped = [], Skipped()
    values = _Values()
    for f in files:
        try:
            r = read_header(f, keep, values)
        except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError,
                struct.error, AttributeError) as e:
            skipped.unreadable.append((str(f), _why(e)))
            continue
        except Exception as e:  # noqa: BLE001 - any other reader failure: one bad file, skipped
            skipped.unreadable.append((str(f), _why(e)))
            continue
        if r is None:
            skipped.not_dicom.append(str(f))
        elif r[1].get("dicomdir"):
            skipped.dicomdir.append(str(f))
        else:
            found.append(r)
    return found, skipped


# --------------------------------------------------------------------------- geometry helpers
def normal_of(iop) -> np.ndarray:
    """Unit slice normal (row × column) of an ImageOrientationPatient."""
    n = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return n / (np.linalg.norm(n) or 1.0)


def orientation_label(vec) -> str:
    """axial / coronal / sagittal from the dominant axis of a slice normal, else oblique."""
    v = np.abs(np.asarray(vec, float))
    i = int(np.argmax(v))
    if v[i] < math.cos(math.radians(_OBLIQUE_DEG)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[i]


def stack_geometry(refs: list[InstanceRef]) -> dict:
    """Sort refs along the slice normal and describe the stack.

    Returns dict(order, normal, axis, t (positions along ``axis``), tilt_deg). ``axis`` is
    the unit vector from the first to the last slice position; it differs from ``normal``
    by the gantry tilt.
    """
    iop = refs[0].meta.get("iop")
    n = normal_of(iop)
    pos = np.array([r.position for r in refs], float)
    d = pos @ n
    order = sorted(range(len(refs)), key=lambda i: (d[i], refs[i].instance_number or 0, refs[i].file,
                                                    refs[i].frame or 0))
    axis, tilt = n, 0.0
    if len(refs) > 1:
        span = pos[order[-1]] - pos[order[0]]
        if np.linalg.norm(span) > POSITION_TOL_MM:
            axis = span / np.linalg.norm(span)
            tilt = math.degrees(math.acos(min(1.0, abs(float(axis @ n)))))
            if tilt < _TILT_MIN_DEG:
                axis, tilt = n, 0.0
    t = pos[order] @ axis
    return {"order": order, "normal": n, "axis": axis, "t": t, "tilt_deg": tilt}


def spacing_stats(t: np.ndarray) -> dict[str, float]:
    """min/median/max step between consecutive distinct slice positions (mm)."""
    steps = np.diff(np.asarray(t, float))
    steps = steps[steps > POSITION_TOL_MM]
    if not len(steps):
        return {}
    return {"min": float(steps.min()), "median": float(np.median(steps)),
            "max": float(steps.max()), "largest_gap": float(steps.max())}


# --------------------------------------------------------------------------- grouping
_NON_IMAGE = {
    "1.2.840.10008.5.1.4.1.1.88": "structured report (SR), not an image",
    "1.2.840.10008.5.1.4.1.1.481": "radiotherapy (RT) object, not a CT image",
    "1.2.840.10008.5.1.4.1.1.66": "segmentation/registration object, not a CT image",
    "1.2.840.10008.5.1.4.1.1.11": "presentation state, not an image",
    "1.2.840.10008.5.1.4.1.1.104": "encapsulated document (PDF/CDA), not an image",
    "1.2.840.10008.5.1.4.1.1.9": "waveform, not an image",
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _orientation_clusters(members: list) -> dict[int, int]:
    """Cluster id per ref (by id()) of ImageOrientationPatient within 1e-3 (robust to the
    rounding jitter that makes exact or rounded comparisons split a stack)."""
    reps: list[np.ndarray] = []
    out = {}
    for r, _ in members:
        iop = r.meta.get("iop")
        if iop is None:
            out[id(r)] = -1
            continue
        v = np.asarray(iop, float)
        for i, rep in enumerate(reps):
            if np.abs(v - rep).max() <= 1e-3:
                out[id(r)] = i
                break
        else:
            reps.append(v)
            out[id(r)] = len(reps) - 1
    return out


def _split_key(ref: InstanceRef, facts: dict, orient: int) -> tuple:
    m = ref.meta
    iop = orient
    sp = tuple(round(v, 4) for v in m["spacing"]) if m.get("spacing") else None
    localizer = any(w in facts["image_type"] for w in ("LOCALIZER", "SCOUT", "TOPOGRAM"))
    return (iop, m.get("rows"), m.get("cols"), sp, localizer, tuple(facts["image_type"][:2]),
            facts["sop_class_uid"], facts["frame_of_reference_uid"])


def group_series(found: list[tuple[list[InstanceRef], dict]], source: str) -> list[SeriesInfo]:
    """Group instances by SeriesInstanceUID (or a fallback key when it is empty), split where
    orientation, matrix, pixel spacing, image type, frame of reference or repeated
    acquisitions differ, and
    describe each group as a :class:`SeriesInfo`."""
    by_series: dict[tuple, list] = defaultdict(list)
    for refs, facts in found:
        uid = facts["series_instance_uid"]
        key = ("uid", uid) if uid else (
            "nouid", facts["study_instance_uid"], facts["frame_of_reference_uid"],
            facts["series_number"], facts["series_description"], facts["modality"], facts["folder"])
        for r in refs:
            by_series[key].append((r, facts))

    out: list[SeriesInfo] = []
    for skey, members in by_series.items():
        parts: dict[tuple, list] = defaultdict(list)
        orient = _orientation_clusters(members)
        for r, facts in members:
            parts[_split_key(r, facts, orient[id(r)])].append((r, facts))
        groups = []
        for _pkey, pm in parts.items():
            groups.extend(_split_acquisitions(pm))
        groups.sort(key=lambda g: (-len(g), g[0][0].file))
        for _i, g in enumerate(groups):
            info = _describe(g, source, split=len(groups) > 1)
            if skey[0] == "nouid":
                info.warnings.append(
                    "SeriesInstanceUID is empty in the data sets: grouped by FrameOfReferenceUID, "
                    "series number, description and folder instead")
            out.append(info)
    out.sort(key=lambda s: (s.series_number if s.series_number is not None else 1 << 30,
                            s.series_instance_uid or "", -s.n_instances))
    _assign_keys(out)
    return out


def _split_acquisitions(members: list) -> list[list]:
    """Split a group by AcquisitionNumber when positions repeat across acquisitions
    (e.g. two phases stored under one SeriesInstanceUID)."""
    pos = [tuple(np.round(r.position, 2)) if r.position else None for r, _ in members]
    if len(set(pos)) == len(pos):
        return [members]
    acq = defaultdict(list)
    for r, f in members:
        acq[r.meta.get("acquisition")].append((r, f))
    if len(acq) < 2:
        return [members]
    for g in acq.values():
        p = [tuple(np.round(r.position, 2)) if r.position else None for r, _ in g]
        if len(set(p)) != len(p):
            return [members]
    return list(acq.values())


def _assign_keys(series: list[SeriesInfo]) -> None:
    """Keys: ``s<SeriesNumber>`` (``s3.1``, ``s3.2`` when a number repeats), ``dcm<i>`` when
    the series has no number."""
    total: dict[str, int] = {}
    for s in series:
        if s.series_number is not None:
            total[f"s{s.series_number}"] = total.get(f"s{s.series_number}", 0) + 1
    count: dict[str, int] = {}
    unnumbered = 0
    for s in series:
        if s.series_number is None:
            unnumbered += 1
            s.key = f"dcm{unnumbered}"
            continue
        base = f"s{s.series_number}"
        count[base] = count.get(base, 0) + 1
        s.key = base if total[base] == 1 else f"{base}.{count[base]}"


def _describe(members: list, source: str, split: bool) -> SeriesInfo:
    refs = [r for r, _ in members]
    facts = members[0][1]
    m0 = refs[0].meta
    info = SeriesInfo(
        key="", kind="dicom", source=str(source), instances=refs,
        study_instance_uid=facts["study_instance_uid"],
        series_instance_uid=facts["series_instance_uid"],
        frame_of_reference_uid=facts["frame_of_reference_uid"],
        sop_class_uid=facts["sop_class_uid"], modality=facts["modality"],
        series_number=facts["series_number"], series_description=facts["series_description"],
        image_type=facts["image_type"], body_part=facts["body_part"],
        rows=m0.get("rows"), columns=m0.get("cols"),
        pixel_spacing=m0.get("spacing"), slice_thickness=m0.get("thickness"),
        transfer_syntax=facts["transfer_syntax"],
        patient_id=facts["patient_id"], patient_name=facts["patient_name"],
        study_date=facts["study_date"])
    if split:
        info.warnings.append("this series was split: its instances differ in orientation, matrix, "
                             "pixel spacing, image type, frame of reference or acquisition")
    reason = _unusable_reason(refs, facts)
    geometric = all(r.position is not None for r in refs) and m0.get("iop") is not None
    if geometric:
        g = stack_geometry(refs)
        info.instances = [refs[i] for i in g["order"]]
        info.orientation = orientation_label(g["axis"] if g["tilt_deg"] else g["normal"])
        info.gantry_tilt = round(g["tilt_deg"], 4)
        info.spacing_stats = spacing_stats(g["t"])
        n_unique = 1 + int(np.sum(np.diff(g["t"]) > POSITION_TOL_MM)) if len(refs) else 0
        if n_unique < len(refs):
            info.warnings.append(f"{len(refs) - n_unique} instance(s) repeat a slice position "
                                 "(duplicates are dropped when loading)")
        if g["tilt_deg"]:
            info.warnings.append(f"gantry tilt {g['tilt_deg']:.2f} deg (slices are sheared; "
                                 "loading resamples onto an orthogonal grid)")
        st = info.spacing_stats
        if st and st["max"] > 1.5 * st["median"]:
            info.warnings.append(f"missing slice(s): largest gap {st['max']:.3f} mm "
                                 f"vs median spacing {st['median']:.3f} mm")
        elif st and st["max"] - st["min"] > max(0.01 * st["median"], POSITION_TOL_MM):
            info.warnings.append(f"irregular slice spacing {st['min']:.3f}..{st['max']:.3f} mm")
        if reason is None and n_unique < 2:
            info.warnings.append("single slice: not a volume (a one-slice input)")
    elif reason is None:
        if len(refs) == 1:
            info.warnings.append("single slice without position/orientation: geometry assumed")
        else:
            reason = "no ImagePositionPatient/ImageOrientationPatient: slices cannot be placed in space"
    if reason:
        info.usable, info.unusable_reason = False, reason
    return info


def _unusable_reason(refs: list[InstanceRef], facts: dict) -> str | None:
    sop = facts["sop_class_uid"] or ""
    for prefix, why in _NON_IMAGE.items():
        if sop.startswith(prefix):
            return why
    if facts["modality"] in ("SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "KO", "SEG", "REG", "DOC"):
        return f"{facts['modality']} object, not a CT image"
    if not facts["has_pixels"] or not refs[0].meta.get("rows") or not refs[0].meta.get("cols"):
        return "non-image object (no pixel data, or Rows/Columns 0)"
    if sop.startswith(_SECONDARY_CAPTURE):
        return "secondary capture (a screenshot-like image, no reliable geometry or HU)"
    it = facts["image_type"]
    if any(w in it for w in ("LOCALIZER", "SCOUT", "TOPOGRAM")):
        return "localizer/scout image"
    if refs[0].meta.get("samples", 1) != 1:
        return "colour image (SamplesPerPixel > 1), not a CT volume"
    pi = (refs[0].meta.get("photometric") or "MONOCHROME2").upper()
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        return f"PhotometricInterpretation {pi}: not a monochrome CT image"
    return None
