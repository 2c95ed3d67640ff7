"""Hostile and broken input (issue 15): every case is built here, in a fixture; each must
end in a result or a clear DicompipeError, never a wrong answer, a hang or a traceback."""
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib

import numpy as np
import pydicom
import pytest
from synth import write_ct_series, write_nifti, write_png_slices

from dicompipe import history, io
from dicompipe.errors import HistoryError, NoSeriesFound, UnreadableSeries, UnsupportedInput
from dicompipe.io import dicom as dicom_mod
from dicompipe.io.archive import extract_zip
from dicompipe.io.limits import parse_size
from dicompipe.io.loader import _decode_file
from dicompipe.report import files as report_files


@pytest.fixture(autouse=True)
def _deadline():
    """No case may hang: fail after 120 s instead of blocking the suite."""
    def boom(*_):
        raise TimeoutError("hostile-input test took more than 120 s (a hang?)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _edit(files, fn):
    """Apply ``fn(ds, i)`` to each DICOM file and save it back (pydicom's DS warnings muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            fn(ds, i)
            ds.save_as(f)
    return files


def _series(tmp_path, name="ct", n=6, **kw):
    return write_ct_series(tmp_path / name, shape=(n, 16, 20), **kw)


# --------------------------------------------------------------------------- 1. short pixel data
@pytest.mark.parametrize("fast", [True, False])
def test_short_pixel_data_is_refused_not_read(tmp_path, monkeypatch, fast):
    monkeypatch.setattr(dicom_mod, "_FAST_HEADERS", fast)
    files = _edit(_series(tmp_path), lambda ds, i: setattr(ds, "PixelData", ds.PixelData[:100]))
    with pytest.raises(NoSeriesFound,
                       match=r"Pixel Data holds 100 bytes but 16 x 20 x 1 frame\(s\) x 16 bits need 640"):
        io.discover(files[0].parent)


def test_one_short_file_among_good_ones_is_skipped_and_counted(tmp_path):
    files = _series(tmp_path)
    _edit(files[-1:], lambda ds, i: setattr(ds, "PixelData", ds.PixelData[:100]))
    found = io.discover(files[0].parent)
    assert found[0].n_instances == 5 and "1 unreadable DICOM file(s) skipped" in found.skipped_summary
    vol = io.load(io.select(found))
    assert vol.shape[0] == 5 and np.isfinite(vol.array).all()


def test_native_pixel_data_never_falls_back_to_gdcm(tmp_path):
    (f, *_) = _edit(_series(tmp_path, n=2), lambda ds, i: setattr(ds, "PixelData", ds.PixelData[:100]))
    with pytest.raises(Exception) as e:                # pydicom's own refusal, not GDCM's buffer
        _decode_file(str(f), pydicom.uid.ExplicitVRLittleEndian, (16, 20))
    assert not isinstance(e.value, AssertionError)


# --------------------------------------------------------------------------- 2. NaN / inf
@pytest.mark.parametrize("attr, value, words", [
    ("ImagePositionPatient", ["nan", "0", "0"], "ImagePositionPatient"),
    ("ImagePositionPatient", ["1e300", "0", "0"], "ImagePositionPatient"),
    ("ImageOrientationPatient", ["inf", "0", "0", "0", "1", "0"], "ImageOrientationPatient"),
    ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"], "degenerate"),
    ("PixelSpacing", ["nan", "0.8"], "PixelSpacing"),
    ("PixelSpacing", ["0", "0"], "PixelSpacing"),
    ("PixelSpacing", ["-0.7", "-0.7"], "must be positive"),
    ("RescaleSlope", "nan", "RescaleSlope"),
    ("RescaleSlope", "0", "RescaleSlope 0"),
    ("RescaleIntercept", "inf", "RescaleIntercept"),
    ("RescaleIntercept", "-inf", "RescaleIntercept"),
])
def test_non_finite_or_degenerate_header_values_are_refused(tmp_path, attr, value, words):
    files = _edit(_series(tmp_path), lambda ds, i: setattr(ds, attr, value))
    with pytest.raises(NoSeriesFound) as e:
        io.discover(files[0].parent)
    assert words in str(e.value) and "nan" not in str(e.value).split("skipped")[0]


def test_nan_in_one_slice_never_reaches_the_volume(tmp_path):
    files = _series(tmp_path, n=8)
    _edit(files[3:4], lambda ds, i: setattr(ds, "ImagePositionPatient", ["nan", "nan", "nan"]))
    found = io.discover(files[0].parent)
    vol = io.load(io.select(found))
    assert all(np.isfinite(vol.image.GetSpacing())) and np.isfinite(vol.array).all()
    assert any("ImagePositionPatient" in w for w in found[0].warnings)


def test_nan_voxels_are_refused(tmp_path):
    hu = np.full((4, 8, 8), -500.0, np.float32)
    hu[2, 3, 3] = np.nan
    p = write_nifti(tmp_path / "nan.nii.gz", hu, dtype=np.float32)
    with pytest.raises(UnreadableSeries, match="NaN or infinite"):
        io.load(io.discover(p)[0])


# --------------------------------------------------------------------------- 3. memory bombs
def test_huge_rows_columns_with_few_bytes_are_refused(tmp_path):
    files = _edit(_series(tmp_path), lambda ds, i: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)))
    with pytest.raises(NoSeriesFound, match="65535 x 65535 x 1 frame"):
        io.discover(files[0].parent)


def test_memory_budget_is_checked_before_allocating(tmp_path, monkeypatch):
    files = _series(tmp_path)
    chosen = io.select(io.discover(files[0].parent))
    with pytest.raises(UnreadableSeries, match="more than the allowed"):
        io.load(chosen, max_memory=10_000)
    monkeypatch.setenv("DICOMPIPE_MAX_MEMORY", "10K")
    with pytest.raises(UnreadableSeries, match="--max-memory"):
        io.load(chosen)
    monkeypatch.delenv("DICOMPIPE_MAX_MEMORY")
    assert io.load(chosen).shape == (6, 16, 20)
    imgs = write_png_slices(tmp_path / "png", n=3)
    with pytest.raises(UnreadableSeries, match="more than the allowed"):
        io.load(io.discover(imgs[0].parent)[0], max_memory="1K")


def test_parse_size():
    assert parse_size("4G") == 4 << 30 and parse_size("512m") == 512 << 20
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30)) and parse_size(1234) == 1234
    with pytest.raises(UnsupportedInput, match="not understood"):
        parse_size("lots")


def _nifti_bomb(path, dims=(2048, 2048, 1024)):
    import nibabel as nib
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(dims)
    hdr.set_data_dtype(np.int16)
    path.write_bytes(hdr.binaryblock + b"\0" * 68)
    return path


def test_nifti_with_huge_dims_in_a_tiny_file_is_refused(tmp_path):
    p = _nifti_bomb(tmp_path / "bomb.nii")
    assert p.stat().st_size == 416
    with pytest.raises(UnsupportedInput, match="header says 2048 x 2048 x 1024") as e:
        io.discover(p)
    assert "sheared" not in str(e.value)


def test_gzipped_nifti_with_lying_dims_is_refused(tmp_path):
    import gzip
    raw = _nifti_bomb(tmp_path / "b.nii", (512, 512, 300)).read_bytes()
    p = tmp_path / "b.nii.gz"
    p.write_bytes(gzip.compress(raw))
    with pytest.raises(UnsupportedInput, match="truncated or its header is wrong"):
        io.discover(p)


# --------------------------------------------------------------------------- 4. frame counts
def test_huge_number_of_frames_is_bounded_by_the_file(tmp_path):
    (f, *_) = _edit(_series(tmp_path, n=2), lambda ds, i: setattr(ds, "NumberOfFrames", 100_000_000))
    t0 = time.monotonic()
    with pytest.raises(UnsupportedInput, match="100000000 frame"):
        io.discover(f)
    assert time.monotonic() - t0 < 5


def test_huge_number_of_frames_in_compressed_file(tmp_path):
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.NumberOfFrames = 10_000_000
    ds.save_as(tmp_path / "j.dcm")
    with pytest.raises(UnsupportedInput, match="impossible in a file"):
        io.discover(tmp_path / "j.dcm")


def test_huge_number_of_frames_without_an_image_is_ignored(tmp_path):
    """Found by the 20,000-case fuzz run: a header with NumberOfFrames 1e8 but no Rows made
    discovery build one reference per frame (minutes of CPU)."""
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    ds.NumberOfFrames = 100_000_000
    ds.save_as(tmp_path / "plan.dcm")
    t0 = time.process_time()
    with pytest.raises(NoSeriesFound):
        io.select(io.discover(tmp_path))
    assert time.process_time() - t0 < 5


# --------------------------------------------------------------------------- 5. FIFOs
def test_fifo_as_input_is_refused_without_opening(tmp_path):
    os.mkfifo(tmp_path / "x.dcm")
    with pytest.raises(UnsupportedInput, match="not a regular file"):
        io.discover(tmp_path / "x.dcm")


def test_fifo_in_a_folder_is_skipped_and_counted(tmp_path):
    files = _series(tmp_path)
    os.mkfifo(files[0].parent / "pipe.dcm")
    found = io.discover(files[0].parent)
    assert found[0].n_instances == 6 and "pipe.dcm" in found.skipped_summary
    with pytest.raises(OSError, match="not a regular file"):
        dicom_mod.read_header(files[0].parent / "pipe.dcm")


# --------------------------------------------------------------------------- 6. tracebacks
def test_symlink_loop_is_skipped_and_counted(tmp_path):
    files = _series(tmp_path)
    os.symlink("loop.dcm", files[0].parent / "loop.dcm")
    found = io.discover(files[0].parent)
    assert found[0].n_instances == 6 and "loop.dcm" in found.skipped_summary


def _png_bomb(path, w=20000, h=20000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + chunk(b"IEND", b""))
    return path


def test_png_over_pil_pixel_limit_is_skipped(tmp_path):
    imgs = write_png_slices(tmp_path / "png", n=3)
    _png_bomb(imgs[0].parent / "zz_bomb.png")
    found = io.discover(imgs[0].parent)
    assert found[0].n_instances == 3 and "1 non-DICOM file(s) skipped" in found.skipped_summary


def test_png_with_a_corrupt_chunk_after_the_header_is_skipped(tmp_path):
    """Found by the fuzz run: Pillow reads the header fine, then raises SyntaxError for a
    broken chunk inside the pixel data while decoding."""
    imgs = write_png_slices(tmp_path / "png", n=3)
    png = imgs[1].read_bytes()
    i = png.index(b"IDAT") - 4
    n = struct.unpack(">I", png[i:i + 4])[0]
    half = png[i + 8:i + 8 + n // 2]
    idat = struct.pack(">I", len(half)) + b"IDAT" + half + struct.pack(">I", zlib.crc32(b"IDAT" + half))
    imgs[1].write_bytes(png[:i] + idat + b"\x00\x00\x00\x04\x9e\xb9\xbc\x75abcdxxxx" + png[i + 12 + n:])
    vol = io.load(io.select(io.discover(imgs[0].parent)))
    assert vol.array.shape[0] == 2 and any("skipped unreadable image" in w for w in vol.warnings)


def test_negative_thickness_without_position(tmp_path):
    def edit(ds, i):
        del ds.ImagePositionPatient
        ds.SliceThickness = "-2.5"
    (f,) = _edit(_series(tmp_path, n=1), edit)
    vol = io.load(io.select(io.discover(f)))
    assert vol.image.GetSpacing()[2] == 1.0


def test_bits_allocated_zero_says_so(tmp_path):
    files = _edit(_series(tmp_path), lambda ds, i: setattr(ds, "BitsAllocated", 0))
    with pytest.raises(NoSeriesFound, match="BitsAllocated 0 is invalid") as e:
        io.discover(files[0].parent)
    assert "codec" not in str(e.value)


# --------------------------------------------------------------------------- 8. zip bombs
def _bomb_zip(path, mib=32):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("export/big.dcm", "w") as f:
            for _ in range(mib):
                f.write(b"\0" * (1 << 20))
    return path


def test_zip_bomb_refused_before_extraction(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    z = _bomb_zip(tmp_path / "bomb.zip")
    with pytest.raises(UnsupportedInput, match="zip bomb") as e:
        extract_zip(z, tmp_dir=tmp)
    assert "damaged" not in str(e.value) and list(tmp.iterdir()) == []


def test_zip_declaring_more_than_the_limit_refused_before_extraction(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    files = _series(tmp_path)
    from synth import make_zip
    z = make_zip(files[0].parent, tmp_path / "a.zip")
    with pytest.raises(UnsupportedInput, match="more than the allowed .* nothing was extracted"):
        extract_zip(z, tmp_dir=tmp, max_bytes=1000)
    assert list(tmp.iterdir()) == []


def test_zip_out_of_space_says_so(tmp_path, monkeypatch):
    import shutil as _shutil
    files = _series(tmp_path)
    from synth import make_zip
    z = make_zip(files[0].parent, tmp_path / "a.zip")
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(UnsupportedInput, match="has 0.0 MiB free"):
        extract_zip(z, tmp_dir=tmp_path)


# --------------------------------------------------------------------------- 9. history
def test_bad_history_fails_before_the_analysis(tmp_path, monkeypatch, capsys):
    import dicompipe.pipeline
    from dicompipe.cli import main
    called = []
    monkeypatch.setattr(dicompipe.pipeline, "analyze", lambda *a, **k: called.append(1))
    bad = tmp_path / "h.sqlite"
    bad.write_text("not a database")
    rc = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "runs"), "--history",
               str(bad), "--quiet"])
    assert rc == 2 and not called and not (tmp_path / "runs").exists()
    assert "not a readable dicompipe history" in capsys.readouterr().err
    assert bad.read_text() == "not a database"


def test_foreign_sqlite_with_analyses_table_is_left_untouched(tmp_path):
    db = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE analyses (id INTEGER PRIMARY KEY, what TEXT)")
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(HistoryError, match="not a dicompipe case history"):
        history.check(db)
    assert db.read_bytes() == before
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


def test_full_disk_says_so(tmp_path, monkeypatch):
    from analysis_factory import make_analysis
    db = tmp_path / "h.sqlite"
    history.check(db)
    real = sqlite3.connect

    def full(*a, **k):                       # SQLITE_FULL as on a full disk: no page may be added
        con = real(*a, **k)
        n = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {n}")
        return con
    monkeypatch.setattr(history.sqlite3, "connect", full)
    big = make_analysis()
    big.warnings = ["x" * 100_000]
    with pytest.raises(HistoryError, match="is full") as e:
        history.record(big, report_dir=None, db=db)
    assert "no transaction is active" not in str(e.value)


# --------------------------------------------------------------------------- 10. leftovers
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_run_and_zip_folders_are_cleaned(tmp_path):
    old = time.time() - 7200
    dead = _dead_pid()
    stale = tmp_path / f".dicompipe-run-{dead}-abc.partial"
    legacy = tmp_path / ".dicompipe-run-x1y2.partial"
    alive = tmp_path / f".dicompipe-run-{os.getpid()}-abc.partial"
    fresh = tmp_path / f".dicompipe-run-{dead}-new.partial"
    zdir = tmp_path / f"dicompipe-zip-{dead}-q"
    other = tmp_path / "keep-me"
    for d in (stale, legacy, alive, fresh, zdir, other):
        d.mkdir()
        (d / "f").write_text("x")
    for d in (stale, legacy, alive, zdir, other):
        os.utime(d, (old, old))
    stage = report_files.staging_dir(tmp_path)
    assert not stale.exists() and not legacy.exists()
    assert alive.exists() and fresh.exists() and other.exists() and zdir.exists()
    assert stage.name.startswith(f".dicompipe-run-{os.getpid()}-")
    files = _series(tmp_path, name="src")
    from synth import make_zip
    with extract_zip(make_zip(files[0].parent, tmp_path / "a.zip"), tmp_dir=tmp_path) as arc:
        assert arc.path.name.startswith(f"dicompipe-zip-{os.getpid()}-")
    assert not zdir.exists() and other.exists()


# --------------------------------------------------------------------------- 11. rules
def test_complete_series_beats_a_few_thin_slices(tmp_path):
    write_ct_series(tmp_path / "thin", shape=(3, 16, 20), spacing=(0.75, 0.8, 1.0), series_number=2)
    write_ct_series(tmp_path / "full", shape=(16, 16, 20), spacing=(0.75, 0.8, 2.5), series_number=3)
    found = io.discover(tmp_path)
    chosen = io.select(found)
    assert chosen.n_instances == 16
    (thin,) = [s for s in found if s.n_instances == 3]
    assert "partial series" in thin.reason


def test_thin_series_still_wins_when_both_are_complete(tmp_path):
    write_ct_series(tmp_path / "thin", shape=(12, 16, 20), spacing=(0.75, 0.8, 1.0), series_number=2)
    write_ct_series(tmp_path / "full", shape=(16, 16, 20), spacing=(0.75, 0.8, 2.5), series_number=3)
    assert io.select(io.discover(tmp_path)).n_instances == 12


def test_2d_nifti_is_refused_like_a_single_dicom_slice(tmp_path):
    import nibabel as nib

    from dicompipe.pipeline import _check_volume
    nib.save(nib.Nifti1Image(np.full((32, 32), -700, np.int16), np.eye(4)), tmp_path / "one.nii.gz")
    vol = io.load(io.discover(tmp_path / "one.nii.gz")[0])
    with pytest.raises(UnreadableSeries, match="single slice"):
        _check_volume(vol)
    (f,) = _series(tmp_path, n=1)
    with pytest.raises(UnreadableSeries, match="single slice"):
        _check_volume(io.load(io.select(io.discover(f))))


def test_no_exception_escapes_discover_for_a_broken_header(tmp_path, monkeypatch):
    files = _series(tmp_path, n=2)

    def boom(*a, **k):
        raise IndexError("a reader bug on odd bytes")
    monkeypatch.setattr(dicom_mod, "_describe_header", boom)
    with pytest.raises(NoSeriesFound, match="IndexError"):
        io.discover(files[0].parent)


def test_jpeg2000_contradicting_its_header_is_refused_not_aborted(tmp_path):
    """GDCM aborts the process (uncaught C++ exception) on a JPEG 2000 stream whose
    component count contradicts PhotometricInterpretation; found by benchmarks/fuzz.py."""
    from pydicom.data import get_testdata_file
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.PhotometricInterpretation = "RGB"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.save_as(tmp_path / "j.dcm")
    (s,) = io.discover(tmp_path / "j.dcm")
    assert not s.usable and "PhotometricInterpretation RGB" in s.unusable_reason
    code = ("import sys; from dicompipe.io.loader import _decode_file\n"
            "try:\n    _decode_file(sys.argv[1], '1.2.840.10008.1.2.4.90')\n"
            "except Exception as e:\n    print('raised', type(e).__name__)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "j.dcm")], capture_output=True,
                       text=True, timeout=110, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert p.returncode == 0, p.stderr[-500:]             # not -6 (SIGABRT)


def test_zero_columns_is_not_an_image(tmp_path):
    """Found by benchmarks/fuzz.py (seed 0, case 685): Columns 0 reached the pixel reader."""
    files = _edit(_series(tmp_path), lambda ds, i: setattr(ds, "Columns", 0))
    with pytest.raises(NoSeriesFound, match="Rows/Columns 0"):
        io.select(io.discover(files[0].parent))
