"""Transfer syntaxes on pydicom's bundled real files: every compressed variant of MR_small
decodes to the same pixels, CT_small and the JPEG files agree with GDCM (SimpleITK)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from dicompipe import io
from dicompipe.errors import UnreadableSeries
from dicompipe.io.loader import read_pixels

MR_VARIANTS = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
               "MR_small_expb.dcm", "MR_small_padded.dcm", "MR_small_RLE.dcm",
               "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]


def load_file(name):
    path = get_testdata_file(name)
    found = io.discover(path)
    assert len(found) == 1
    return io.load(found[0]), path


def test_every_mr_small_variant_decodes_to_identical_pixels():
    ref, _ = load_file("MR_small.dcm")
    syntaxes = set()
    for name in MR_VARIANTS:
        vol, path = load_file(name)
        syntaxes.add(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        np.testing.assert_array_equal(vol.array, ref.array, err_msg=name)
        assert vol.image.GetOrigin() == ref.image.GetOrigin(), name
        assert vol.image.GetSpacing() == ref.image.GetSpacing(), name
    assert syntaxes == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                        "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                                  "MR_small_bigendian.dcm"])
def test_single_files_match_simpleitk(name):
    vol, path = load_file(name)
    ref = sitk.ReadImage(path, sitk.sitkFloat32)
    np.testing.assert_allclose(vol.image.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.image.GetSpacing()[:2], ref.GetSpacing()[:2], atol=1e-6)
    np.testing.assert_allclose(vol.image.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))


def test_ct_small_is_hu():
    vol, path = load_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[0], expected)
    assert vol.slices[0][0].sop_instance_uid == ds.SOPInstanceUID
    assert vol.slices[0][0].instance_number == int(ds.InstanceNumber)


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPGExtended.dcm"])
def test_jpeg_baseline_and_extended_decode_like_gdcm(name):
    # 8-bit baseline and 12-bit extended JPEG (secondary captures: listed, not loadable
    # as a CT volume, so the pixel reader is checked directly)
    path = get_testdata_file(name)
    found = io.discover(path)
    assert not found[0].usable and "secondary capture" in found[0].unusable_reason
    raw, failed = read_pixels(found[0].instances)
    assert failed == {}
    ref = sitk.GetArrayFromImage(sitk.ReadImage(path))
    np.testing.assert_array_equal(raw, ref)


def test_multiframe_rt_dose_is_listed_not_loaded():
    found = io.discover(get_testdata_file("rtdose.dcm"))
    assert found[0].n_instances == 15 and not found[0].usable
    assert "RT" in found[0].unusable_reason


def test_jpeg_baseline_8bit_series(tmp_path):
    import synth
    hu = lambda x, y, z: 40.0 + 20.0 * np.sin(x / 3.0) + 10.0 * np.cos(y / 4.0) + z
    files = synth.write_ct_series(tmp_path, shape=(3, 32, 32), hu=hu, dtype=np.uint8,
                                  intercept=-100.0)
    exact = io.load(io.select(io.discover(tmp_path))).array.copy()
    synth.transcode_gdcm(files, "JPEGBaselineProcess1")
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    vol = io.load(io.select(io.discover(tmp_path)))
    r = sitk.ImageSeriesReader()
    r.SetFileNames([str(f) for f in files])
    gdcm_decoded = sitk.GetArrayFromImage(r.Execute())
    np.testing.assert_allclose(vol.array, gdcm_decoded, atol=1.0)   # IDCTs may differ by 1
    assert np.abs(vol.array - exact).mean() < 2.0                    # lossy, but close


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_files_without_preamble_or_meta_are_read(name):
    found = io.discover(get_testdata_file(name))           # raw data sets, no 'DICM' preamble
    assert found[0].modality == "RTPLAN" and not found[0].usable


def test_truncated_single_file_says_so():
    s = io.discover(get_testdata_file("MR_truncated.dcm"))[0]
    with pytest.raises(UnreadableSeries, match="truncated pixel data"):
        io.load(s)
