"""io stage on synthetic DICOM series with known geometry, checked against SimpleITK
(ImageSeriesReader / GDCM) as an independent reader where it applies."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import synth
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from dicompipe import io
from dicompipe.errors import NoSeriesFound, UnreadableSeries, UnsupportedInput

SHAPE = (6, 12, 14)
SPACING = (0.75, 0.8, 2.5)
ORIGIN = (-7.5, -6.0, 30.0)


def sitk_read(files):
    r = sitk.ImageSeriesReader()
    r.SetFileNames([str(f) for f in files])
    return r.Execute()


def assert_same_as_sitk(vol, files, atol=0.0):
    ref = sitk_read(files)
    np.testing.assert_allclose(vol.image.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.image.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(vol.image.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(ref).astype(np.float64), atol=atol)


def only(path, **kw):
    found = io.discover(path)
    return io.load(io.select(found, **kw))


def test_shuffled_files_without_extensions_match_simpleitk(tmp_path):
    files = synth.write_ct_series(tmp_path / "ct", shape=SHAPE, spacing=SPACING, origin=ORIGIN,
                                  shuffle=True, names="random")
    found = io.discover(tmp_path)
    assert len(found) == 1 and found[0].n_instances == SHAPE[0]
    vol = io.load(io.select(found))
    assert vol.image.GetPixelID() == sitk.sitkFloat32 and not vol.windowed
    assert vol.shape == SHAPE
    assert vol.image.GetOrigin() == pytest.approx(ORIGIN)
    assert vol.image.GetSpacing() == pytest.approx(SPACING)
    # slices sorted by position (file order in `files`), not InstanceNumber (shuffled)
    assert [z[0].file for z in vol.slices] == [str(f) for f in files]
    numbers = [z[0].instance_number for z in vol.slices]
    assert numbers != sorted(numbers)
    assert_same_as_sitk(vol, files)
    x, y, z = synth.voxel_lps(SHAPE, ORIGIN, SPACING)
    np.testing.assert_allclose(vol.array, np.rint(synth.phantom(SHAPE, ORIGIN, SPACING)(x, y, z)))


def test_two_series_scout_and_sr(tmp_path):
    study = pydicom.uid.generate_uid()
    thin = synth.write_ct_series(tmp_path, shape=(8, 10, 10), spacing=(0.7, 0.7, 1.25),
                                 study_uid=study, series_number=2, description="thin",
                                 subfolder="a", names="noext")
    synth.write_ct_series(tmp_path, shape=(4, 10, 10), spacing=(0.7, 0.7, 5.0), study_uid=study,
                          series_number=3, description="thick", subfolder="b")
    synth.write_scout(tmp_path / "c", study)
    synth.write_sr(tmp_path / "d", study)
    (tmp_path / "notes.txt").write_text("not dicom")
    found = io.discover(tmp_path)
    by = {s.series_description or s.modality: s for s in found}
    assert set(by) == {"thin", "thick", "Topogram", "Radiologist report"}
    assert not by["Topogram"].usable and "localizer" in by["Topogram"].unusable_reason
    assert not by["Radiologist report"].usable and "SR" in by["Radiologist report"].unusable_reason
    assert by["thin"].orientation == "axial" and by["thin"].spacing_stats["median"] == pytest.approx(1.25)
    assert len(found.skipped.not_dicom) == 1
    chosen = io.select(found)
    assert chosen is by["thin"] and "thinnest" in chosen.reason
    assert "thicker" in by["thick"].reason and "localizer" in by["Topogram"].reason
    # forcing by number, key and UID
    assert io.select(found, series=3) is by["thick"]
    assert io.select(found, series="3") is by["thick"]
    assert io.select(found, series=by["thick"].key) is by["thick"]
    assert io.select(found, series=by["thin"].series_instance_uid) is by["thin"]
    with pytest.raises(NoSeriesFound, match="thin"):
        io.select(found, series="9.9.9")
    with pytest.raises(NoSeriesFound, match="localizer"):
        io.select(found, series=by["Topogram"].key)
    assert io.load(chosen).shape == (8, 10, 10)
    assert len(thin) == 8


def test_no_ct_raises_listing_what_was_found(tmp_path):
    synth.write_sr(tmp_path)
    synth.write_scout(tmp_path)
    synth.write_secondary_capture(tmp_path)
    with pytest.raises(NoSeriesFound) as e:
        io.select(io.discover(tmp_path))
    msg = str(e.value)
    assert "structured report" in msg and "localizer" in msg and "secondary capture" in msg


def test_empty_folder_and_non_dicom_only(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"\0" * 300)
    with pytest.raises(NoSeriesFound, match=r"1 non-DICOM.*1 documentation file\(s\) \(a.txt\)"):
        io.discover(tmp_path)


def test_documentation_beside_a_series_is_listed_not_warned_about(tmp_path):
    synth.write_ct_series(tmp_path / "ct", shape=SHAPE, spacing=SPACING)
    for name in ("README", "LICENSE", "ATTRIBUTION", "notes.md", "annotations.xml"):
        (tmp_path / name).write_text("text")
    (tmp_path / "stray.bin").write_bytes(b"\0" * 300)
    found = io.discover(tmp_path)
    assert len(found.skipped.documents) == 5 and found.skipped.other_files == [str(tmp_path / "stray.bin")]
    assert found.skipped_summary == "1 non-DICOM file(s) skipped"
    (tmp_path / "stray.bin").unlink()
    assert not any("skipped" in w for w in io.select(io.discover(tmp_path)).warnings)


def test_duplicate_slice_dropped_with_warning(tmp_path):
    files = synth.write_ct_series(tmp_path, shape=SHAPE, spacing=SPACING, duplicate=[2])
    found = io.discover(tmp_path)
    assert found[0].n_instances == SHAPE[0] + 1
    assert any("repeat a slice position" in w for w in found[0].warnings)
    vol = io.load(io.select(found))
    assert vol.shape == SHAPE
    assert any("duplicating a slice position" in w for w in vol.warnings)
    kept = [f for i, f in enumerate(files) if i != 3]           # the second copy of z=2 dropped
    assert_same_as_sitk(vol, kept)


def test_missing_slice_is_resampled_and_reported(tmp_path):
    hu = lambda x, y, z: 3.0 * x - 2.0 * y + 10.0 * z          # linear: interpolation is exact
    synth.write_ct_series(tmp_path, shape=SHAPE, spacing=SPACING, origin=ORIGIN, hu=hu, skip=[3])
    found = io.discover(tmp_path)
    assert found[0].spacing_stats["largest_gap"] == pytest.approx(2 * SPACING[2])
    assert any("missing slice" in w for w in found[0].warnings)
    vol = io.load(io.select(found))
    assert vol.shape == SHAPE and vol.image.GetSpacing() == pytest.approx(SPACING)
    assert len(vol.slices[3]) == 2 and len(vol.slices[2]) == 1      # interpolated from 2 and 4
    assert any("resampled to a uniform" in w for w in vol.warnings)
    x, y, z = synth.voxel_lps(SHAPE, ORIGIN, SPACING)
    np.testing.assert_allclose(vol.array, hu(x, y, z), atol=1.0)   # int16 rounding of the stored values


def test_gap_above_limit_is_refused(tmp_path):
    synth.write_ct_series(tmp_path, shape=(8, 8, 8), skip=[3, 4, 5])
    s = io.select(io.discover(tmp_path))
    with pytest.raises(UnreadableSeries, match="gap of 10.00 mm"):
        io.load(s)
    assert io.load(s, max_gap=12.0).shape == (8, 8, 8)


def test_gantry_tilt_corrected_onto_orthogonal_grid(tmp_path):
    shape, spacing, origin = (8, 20, 16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)
    hu = lambda x, y, z: 5.0 * x + 4.0 * y + 20.0 * z - 300.0
    files = synth.write_ct_series(tmp_path, shape=shape, spacing=spacing, origin=origin,
                                  hu=hu, tilt_deg=20.0)
    s = io.discover(tmp_path)[0]
    assert s.gantry_tilt == pytest.approx(20.0, abs=1e-3) and s.orientation == "axial"
    vol = io.load(s)
    assert any("gantry tilt 20.00 deg corrected" in w for w in vol.warnings)
    np.testing.assert_allclose(vol.image.GetDirection(), np.eye(3).ravel(), atol=1e-9)
    assert vol.image.GetSpacing()[2] == pytest.approx(2.0)
    # the tilted planes span more table positions than the input, and fewer y rows: all covered
    t = np.deg2rad(20.0)
    assert vol.shape[0] == int((shape[1] - 1) * np.sin(t) / spacing[2] + shape[0] - 1 + 1e-6) + 1
    assert vol.shape[1] == int((shape[1] - 1) * np.cos(t) + 1e-6) + 1 and vol.shape[2] == shape[2]
    # each output slice names the source slice through its centre (none outside the stack)
    centre_z = [vol.image.TransformContinuousIndexToPhysicalPoint(
        ((vol.shape[2] - 1) / 2, (vol.shape[1] - 1) / 2, z))[2] for z in range(vol.shape[0])]
    src_z = {f.name: float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files}
    row_mid = (shape[1] - 1) / 2 * spacing[1] * np.sin(t)        # rise of the tilted plane
    for z, refs in enumerate(vol.slices):
        if refs:
            assert abs(src_z[refs[0].file.split("/")[-1]] + row_mid - centre_z[z]) <= spacing[2] / 2 + 1e-6
    assert any(not r for r in vol.slices) and sum(bool(r) for r in vol.slices) >= shape[0] - 1
    # every voxel inside the acquired (sheared) stack carries the linear truth at its LPS point
    a = vol.array
    idx = np.argwhere(np.ones(a.shape, bool))
    pts = np.array([vol.image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for k, j, i in idx])
    src = np.column_stack([[1.0, 0, 0], [0, np.cos(t), np.sin(t)], [0, 0, spacing[2]]])
    ijk = np.linalg.solve(src, (pts - origin).T).T                  # source (i, j, k) of each voxel
    inside = np.all((ijk > -1e-6) & (ijk < np.array(shape[::-1]) - 1 + 1e-6), axis=1)
    assert inside.sum() > 0.7 * np.prod(shape)
    np.testing.assert_allclose(a[tuple(idx[inside].T)], hu(*pts[inside].T), atol=1.0)
    # without correction: the untilted planes, as SimpleITK would stack them
    raw = io.load(s, correct_tilt=False)
    assert raw.shape == shape and any("NOT corrected" in w for w in raw.warnings)
    assert len(files) == 8


def test_oblique_stack_matches_simpleitk(tmp_path):
    d = np.array([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [-0.6, 0.0, 0.8]])
    files = synth.write_ct_series(tmp_path, shape=SHAPE, spacing=SPACING, origin=ORIGIN,
                                  direction=d, shuffle=True)
    s = io.discover(tmp_path)[0]
    assert s.orientation == "oblique" and s.gantry_tilt == 0
    vol = io.load(s)
    np.testing.assert_allclose(vol.image.GetDirection(), d.ravel(), atol=1e-7)
    assert_same_as_sitk(vol, files)


def test_per_slice_rescale(tmp_path):
    rescale = [(1.0, -1024.0), (0.5, -1024.0), (2.0, -2048.0), (1.0, -1000.0), (0.25, -512.0), (1.0, -1024.0)]
    hu = lambda x, y, z: 0.5 * np.round(2 * (4.0 * x - 3.0 * y + z))   # multiples of 0.5 HU
    files = synth.write_ct_series(tmp_path, shape=SHAPE, spacing=SPACING, origin=ORIGIN,
                                  hu=hu, rescale=rescale)
    vol = only(tmp_path)
    x, y, z = synth.voxel_lps(SHAPE, ORIGIN, SPACING)
    truth = hu(x, y, z)
    for k, (s, b) in enumerate(rescale):
        np.testing.assert_allclose(vol.array[k], np.rint((truth[k] - b) / s) * s + b)
        # SimpleITK's series reader casts every slice to the first slice's pixel type (it would
        # truncate 20.5 HU to 20), so the independent check reads each file on its own
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(files[k]), sitk.sitkFloat32))[0]
        np.testing.assert_array_equal(vol.array[k], ref)


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian, RLELossless])
def test_transfer_syntaxes_round_trip(tmp_path, ts):
    files = synth.write_ct_series(tmp_path, shape=(3, 12, 14), transfer_syntax=ts)
    vol = only(tmp_path)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == ts
    assert_same_as_sitk(vol, files)


def test_jpeg2000_series(tmp_path):
    files = synth.write_ct_series(tmp_path, shape=(2, 64, 64), transfer_syntax=JPEG2000Lossless)
    assert_same_as_sitk(only(tmp_path), files)


@pytest.mark.parametrize("ts", ["JPEGLosslessProcess14_1", "JPEGLosslessProcess14", "JPEGLSLossless"])
def test_lossless_jpeg_family_encoded_by_gdcm(tmp_path, ts):
    # JPEG lossless (the common PACS export) and JPEG-LS, encoded by GDCM (a dependency;
    # pydicom's own JPEG-LS encoder would need pyjpegls, which is not one)
    files = synth.write_ct_series(tmp_path, shape=(3, 16, 20))
    before = only(tmp_path).array.copy()
    synth.transcode_gdcm(files, ts)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID.is_compressed
    vol = only(tmp_path)
    np.testing.assert_array_equal(vol.array, before)
    assert_same_as_sitk(vol, files)


def test_empty_uids_still_group_and_load(tmp_path):
    files = synth.write_ct_series(tmp_path / "x", shape=SHAPE, empty_uids=True, names="noext", shuffle=True)
    found = io.discover(tmp_path)
    assert len(found) == 1 and found[0].series_instance_uid is None
    assert all(r.sop_instance_uid for r in found[0].instances)   # from the file meta
    assert any("SeriesInstanceUID is empty" in w for w in found[0].warnings)
    vol = io.load(io.select(found))
    assert_same_as_sitk(vol, sorted(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2])))


def test_enhanced_ct_multiframe(tmp_path):
    shape, spacing, origin = (5, 12, 14), (0.7, 0.8, 2.0), (-5.0, -4.0, 10.0)
    rescale = [(1.0, -1024.0)] * 4 + [(0.5, -1024.0)]
    p = synth.write_enhanced_ct(tmp_path / "enh.dcm", shape, spacing, origin,
                                rescale=rescale, frame_order=[3, 0, 4, 1, 2])
    s = io.discover(p)[0]
    assert s.n_instances == 5 and s.orientation == "axial"
    vol = io.load(s)
    assert [z[0].frame for z in vol.slices] == [1, 3, 4, 0, 2]
    assert vol.image.GetOrigin() == pytest.approx(origin)
    assert vol.image.GetSpacing() == pytest.approx(spacing)
    x, y, z = synth.voxel_lps(shape, origin, spacing)
    truth = synth.phantom(shape, origin, spacing)(x, y, z)
    for k, (sl, b) in enumerate(rescale):
        np.testing.assert_allclose(vol.array[k], np.rint((truth[k] - b) / sl) * sl + b)


def test_corrupt_and_truncated_files_are_warnings(tmp_path):
    files = synth.write_ct_series(tmp_path, shape=(6, 16, 16))
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 100])              # truncated pixel data
    files[4].write_bytes(data[:200])                           # truncated header
    found = io.discover(tmp_path)
    assert len(found.skipped.unreadable) == 1 and str(files[4]) in found.skipped.unreadable[0][0]
    vol = io.load(io.select(found), max_gap=10)
    assert any(str(files[2]) in w and "truncated" in w for w in vol.warnings)
    assert vol.shape[0] == 6                                    # both holes resampled


def test_input_tree_is_never_written(tmp_path):
    synth.write_ct_series(tmp_path / "in", shape=(4, 8, 8), names="noext")
    synth.write_sr(tmp_path / "in")
    before = synth.tree_hash(tmp_path / "in")
    io.load(io.select(io.discover(tmp_path / "in")))
    assert synth.tree_hash(tmp_path / "in") == before        # same files, bytes and mtimes


def test_instance_meta_spares_a_second_header_parse(tmp_path, monkeypatch):
    synth.write_ct_series(tmp_path, shape=(3, 8, 8))
    s = io.select(io.discover(tmp_path))
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a) or real(*a, **k))
    io.load(s)
    assert calls == []


@pytest.mark.parametrize("signed", [False, True])
def test_bits_stored_below_bits_allocated(tmp_path, signed):
    # 12 stored bits in 16 with junk in the 4 unused high bits: masked / sign-extended like
    # pydicom and GDCM do
    files = synth.write_ct_series(tmp_path, shape=(3, 4, 6), hu=np.full((3, 4, 6), 100.0),
                                  dtype=np.int16 if signed else np.uint16,
                                  intercept=0.0 if signed else -1024.0)
    for p in files:
        ds = pydicom.dcmread(p)
        a = np.frombuffer(ds.PixelData, np.uint16) | np.uint16(0xF000)
        ds.PixelData, ds.BitsStored, ds.HighBit = a.tobytes(), 12, 11
        ds.save_as(p)
    vol = only(tmp_path)
    np.testing.assert_array_equal(vol.array, 100.0)
    assert_same_as_sitk(vol, files)


def test_one_uid_two_orientations_is_split(tmp_path):
    uid = pydicom.uid.generate_uid()
    study = pydicom.uid.generate_uid()
    synth.write_ct_series(tmp_path, shape=(4, 8, 8), series_uid=uid, study_uid=study, subfolder="ax")
    cor = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])        # coronal reformat, same UID
    synth.write_ct_series(tmp_path, shape=(3, 8, 8), series_uid=uid, study_uid=study,
                          direction=cor, subfolder="cor")
    found = io.discover(tmp_path)
    assert sorted((s.orientation, s.n_instances) for s in found) == [("axial", 4), ("coronal", 3)]
    assert all("split" in " ".join(s.warnings) for s in found) and len({s.key for s in found}) == 2
    assert io.select(found).orientation == "axial"


def test_two_acquisitions_at_the_same_positions_are_split(tmp_path):
    uid, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for acq, name in ((1, "art"), (2, "ven")):
        files = synth.write_ct_series(tmp_path, shape=(4, 8, 8), series_uid=uid, study_uid=study,
                                      subfolder=name)
        for p in files:
            ds = pydicom.dcmread(p)
            ds.AcquisitionNumber = acq
            ds.save_as(p)
    found = io.discover(tmp_path)
    assert [s.n_instances for s in found] == [4, 4]
    assert all(not any("repeat a slice position" in w for w in s.warnings) for s in found)


def test_orientation_jitter_does_not_split(tmp_path):
    files = synth.write_ct_series(tmp_path, shape=(4, 8, 8))
    for k, p in enumerate(files):                        # values either side of a rounding edge
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [1, 0, 0.0004999 if k % 2 else 0.0005001, 0, 1, 0]
        ds.save_as(p)
    found = io.discover(tmp_path)
    assert len(found) == 1 and found[0].n_instances == 4


def test_single_unreadable_file_is_unsupported(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("not an image")
    with pytest.raises(UnsupportedInput, match="not a file dicompipe can read"):
        io.discover(p)
