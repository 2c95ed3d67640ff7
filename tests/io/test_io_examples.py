"""io stage on the real samples committed under examples/ (LIDC-IDRI-0001 slab, uncompressed;
TotalSegmentator abdomen series, JPEG 2000 with empty UIDs): geometry and voxels equal
SimpleITK's ImageSeriesReader (GDCM) on the same files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicompipe import io

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def check_against_sitk(path: Path):
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    vol = io.load(io.select(io.discover(path)))
    r = sitk.ImageSeriesReader()
    r.SetFileNames([z[0].file for z in vol.slices])
    ref = r.Execute()
    np.testing.assert_allclose(vol.image.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.image.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(vol.image.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    return vol


def test_lidc_slab():
    vol = check_against_sitk(EXAMPLES / "lidc-idri-0001")
    assert vol.shape == (16, 512, 512) and vol.image.GetSpacing()[2] == pytest.approx(2.5)
    z = [vol.image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (0, 15)]
    assert z == pytest.approx([-132.5, -95.0])
    assert all(s[0].sop_instance_uid for s in vol.slices)


@pytest.mark.slow
def test_abdomen_jpeg2000_with_empty_uids():
    vol = check_against_sitk(EXAMPLES / "abdomen-ct-dicom" / "series")
    assert vol.shape == (20, 512, 512) and vol.series.series_instance_uid is None
    assert vol.series.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert all(s[0].sop_instance_uid for s in vol.slices)          # from the file meta
