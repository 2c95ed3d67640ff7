"""The fast header scan must describe every file exactly as pydicom's reader does."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pydicom
import pytest
import synth
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from dicompipe.io import dicom as D
from dicompipe.io.headerscan import scan_header


def _both(path):
    out = []
    for fast in (True, False):
        D._FAST_HEADERS = fast
        try:
            out.append(D.read_header(path))
        except Exception as e:                       # the same error type is part of agreeing
            out.append(("error", type(e).__name__))
        finally:
            D._FAST_HEADERS = True
    return out


def _scanned(path) -> bool:
    with open(path, "rb") as fp:
        return scan_header(fp) is not None


def test_pydicom_test_files_read_identically():
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) > 100
    fast = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            fast_result, pydicom_result = _both(f)
            if pydicom_result is None or pydicom_result[0] != "error":   # pydicom reads it: agree
                assert fast_result == pydicom_result, f
            fast += _scanned(f)
    assert fast > 100                                  # the fast path did the work


@pytest.mark.parametrize("ts", [None, ImplicitVRLittleEndian])
def test_synthetic_series_and_pixel_offsets(tmp_path, ts):
    kw = {"transfer_syntax": ts} if ts else {}
    files = synth.write_ct_series(tmp_path, shape=(3, 16, 20), names="noext", **kw)
    for f in files:
        assert _scanned(f)
        fast_result, pydicom_result = _both(f)
        assert fast_result == pydicom_result
        meta = fast_result[0][0].meta
        raw = Path(f).read_bytes()
        assert meta["pixel_length"] == 16 * 20 * 2 and meta["pixel_offset"] + meta["pixel_length"] == len(raw)


def test_nested_undefined_length_sequences_are_skipped(tmp_path):
    f = synth.write_ct_series(tmp_path, shape=(2, 16, 20))[0]
    ds = pydicom.dcmread(f)
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-D3000", "Chest"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.AnatomicRegionSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    for it in ds.ReferencedImageSequence:
        it["AnatomicRegionSequence"].is_undefined_length = True
        it.is_undefined_length_sequence_item = True
    out = tmp_path / "undefined.dcm"
    ds.save_as(out)
    assert b"\xfe\xff\xdd\xe0" in out.read_bytes()     # a sequence delimitation item is there
    assert _scanned(out)
    fast_result, pydicom_result = _both(out)
    assert fast_result == pydicom_result
    assert fast_result[0][0].meta["pixel_offset"] is not None


def test_declines_what_it_does_not_cover(tmp_path):
    f = synth.write_ct_series(tmp_path, shape=(2, 16, 20))[0]
    raw = Path(f).read_bytes()
    cases = {"no_preamble": raw[132:], "truncated_header": raw[:300]}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert not _scanned(p), name
        fast_result, pydicom_result = _both(p)
        assert fast_result == pydicom_result, name
    assert os.path.getsize(f) == len(raw)               # the source was not touched
