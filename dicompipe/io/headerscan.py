"""A fast header-only read for the common case: one pass over the bytes in front of Pixel
Data, building the same pydicom ``Dataset`` of raw elements that ``dcmread(...,
stop_before_pixels=True)`` builds, at a fraction of its per-file Python overhead.

It covers Part 10 files (preamble + ``DICM``) in little-endian transfer syntaxes, native or
encapsulated. Sequences are skipped (their contents are not needed to describe a slice),
including undefined-length ones. Anything else — no preamble, big endian, deflate, Enhanced
functional groups, a DICOMDIR, a header longer than the first read, a truncated or odd
file — returns ``None`` and the caller uses pydicom's reader, so behaviour on unusual files
is pydicom's. A test checks that both paths give identical headers on pydicom's test files.

Example::

    >>> got = scan_header(open("slice.dcm", "rb"))
    >>> if got: ds, ts, pixel_offset, pixel_length = got
"""
from __future__ import annotations

import struct

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

FIRST_READ = 64 * 1024
_UNDEFINED = 0xFFFFFFFF
_LONG_VR = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR",
            b"SV", b"UV"}
_VALID_VR = _LONG_VR | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"}
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
# pydicom must read these: Enhanced CT functional groups, DICOMDIR records
_NEEDS_PYDICOM = {0x52009229, 0x52009230, 0x00041220}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_tag = struct.Struct("<HH").unpack_from


def _element(buf: bytes, pos: int, implicit: bool):
    """(tag, VR bytes or None, value length, header length) of the element at ``pos``."""
    g, e = _tag(buf, pos)
    tag = g << 16 | e
    if implicit or g == 0xFFFE:
        return tag, None, _u32(buf, pos + 4)[0], 8
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VR:
        return tag, vr, _u32(buf, pos + 8)[0], 12
    return tag, vr, _u16(buf, pos + 6)[0], 8


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``; -1 if the
    bytes do not allow it (the caller falls back to pydicom)."""
    n = len(buf)
    while pos + 8 <= n:
        tag, _, ln, _ = _element(buf, pos, True)
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            return -1
        pos += 8
        if ln != _UNDEFINED:
            pos += ln
            continue
        while True:                                   # elements of an undefined-length item
            if pos + 12 > n:
                return -1
            tag, vr, ln, hdr = _element(buf, pos, implicit)
            if tag == _ITEM_END:
                pos += 8
                break
            pos += hdr
            if ln == _UNDEFINED:
                if not (implicit or vr == b"SQ"):
                    return -1
                pos = _skip_sequence(buf, pos, implicit)
                if pos < 0:
                    return -1
            else:
                pos += ln
    return -1


def scan_header(fp) -> tuple[Dataset, UID, int | None, int | None] | None:
    """(data set with file_meta, transfer syntax, pixel value offset, pixel value length)
    for a file opened in binary mode at its start, or ``None`` when pydicom should read it.
    The offset/length are given for native little-endian Pixel Data only."""
    buf = fp.read(FIRST_READ)
    whole = len(buf) < FIRST_READ
    n = len(buf)
    if n < 144 or buf[128:132] != b"DICM":
        return None
    meta: dict = {}
    pos = 132
    try:
        while pos + 8 <= n and buf[pos:pos + 2] == b"\x02\x00":
            tag, vr, ln, hdr = _element(buf, pos, False)
            if ln == _UNDEFINED or pos + hdr + ln > n or vr is None:
                return None
            meta[BaseTag(tag)] = RawDataElement(BaseTag(tag), vr.decode("ascii"), ln,
                                                buf[pos + hdr:pos + hdr + ln], pos + hdr,
                                                False, True, True, False)
            pos += hdr + ln
        ts_elem = meta.get(0x00020010)
        if ts_elem is None:
            return None
        ts = UID(ts_elem.value.decode("ascii", "replace").strip(" \x00"))
        if ts in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
            return None
        implicit = ts == ImplicitVRLittleEndian
        elems: dict = {}
        offset = length = None
        while True:
            if pos + 8 > n:
                if whole and pos == n and elems:
                    break                                  # the whole file, no Pixel Data
                return None
            tag, vr, ln, hdr = _element(buf, pos, implicit)
            if tag in _PIXEL_TAGS:
                if tag != 0x7FE00010:
                    return None
                if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and (
                        implicit or vr in (b"OW", b"OB")) and ln != _UNDEFINED:
                    offset, length = pos + hdr, ln
                break
            if tag in _NEEDS_PYDICOM or tag >> 16 == 0xFFFE or (vr is not None and vr not in _VALID_VR):
                return None
            if ln == _UNDEFINED:
                if not (implicit or vr == b"SQ"):
                    return None
                pos = _skip_sequence(buf, pos + hdr, implicit)
                if pos < 0:
                    return None
                continue
            if pos + hdr + ln > n:
                return None
            if vr != b"SQ":
                elems[BaseTag(tag)] = RawDataElement(
                    BaseTag(tag), vr.decode("ascii") if vr else None, ln,
                    buf[pos + hdr:pos + hdr + ln], pos + hdr, implicit, True, True, False)
            pos += hdr + ln
    except (struct.error, UnicodeDecodeError):
        return None
    ds = Dataset(elems)
    ds.file_meta = FileMetaDataset(meta)
    ds.set_original_encoding(implicit, True, None)
    return ds, ts, offset, length
