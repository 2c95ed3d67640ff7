"""io stage: zip archives, DICOMDIR, PNG/JPG slice folders, NIfTI, and `dicompipe series`."""
from __future__ import annotations

import gc
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import synth
from pydicom.data import get_testdata_file

from dicompipe import io
from dicompipe.cli import main
from dicompipe.errors import NoSeriesFound, UnsupportedInput
from dicompipe.io.images import natural_key


# --------------------------------------------------------------------------- zip
def test_zip_is_extracted_loaded_and_cleaned_up(tmp_path):
    synth.write_ct_series(tmp_path / "export" / "a", shape=(4, 10, 12), names="noext")
    z = synth.make_zip(tmp_path / "export", tmp_path / "export.zip", prefix="study/")
    before = synth.tree_hash(z)
    found = io.discover(z)
    folder = found.archive.path
    assert folder.is_dir() and found[0].source == str(z)
    assert found[0].instances[0].meta["archive_member"].startswith("study/a/")
    vol = io.load(io.select(found))
    ref = sitk.ReadImage(str(tmp_path / "export" / "a" / "IM0001"), sitk.sitkFloat32)
    np.testing.assert_array_equal(vol.array[0], sitk.GetArrayFromImage(ref)[0])
    del found
    gc.collect()
    assert folder.is_dir()                   # the Volume still refers to the extracted files
    del vol
    gc.collect()
    assert not folder.exists()               # removed with the last object that used it
    assert synth.tree_hash(z) == before


def test_zip_explicit_cleanup(tmp_path):
    synth.write_ct_series(tmp_path / "e", shape=(2, 8, 8))
    found = io.discover(synth.make_zip(tmp_path / "e", tmp_path / "e.zip"))
    found.archive.cleanup()
    assert not found.archive.path.exists()


@pytest.mark.parametrize("name", ["../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm", "C:/evil.dcm"])
def test_zip_path_traversal_refused(tmp_path, name):
    synth.write_ct_series(tmp_path / "e", shape=(2, 8, 8))
    z = synth.make_zip(tmp_path / "e", tmp_path / "e.zip", extra={name: b"x"})
    with pytest.raises(UnsupportedInput, match="Unsafe member"):
        io.discover(z)
    assert not (tmp_path / "evil.dcm").exists()


def test_zip_symlink_refused(tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsupportedInput, match="symbolic link"):
        io.discover(z)


def test_zip_size_bound(tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", b"\0" * 2_000_000)
    with pytest.raises(UnsupportedInput, match="expands to more than"):
        io.discover(z, max_zip_bytes=1_000_000)


def test_damaged_zip(tmp_path):
    z = tmp_path / "bad.zip"
    synth.write_ct_series(tmp_path / "e", shape=(2, 8, 8))
    data = synth.make_zip(tmp_path / "e", tmp_path / "tmp.zip").read_bytes()
    z.write_bytes(data[:40] + data[-200:])
    with pytest.raises(UnsupportedInput):
        io.discover(z)


# --------------------------------------------------------------------------- DICOMDIR
def test_dicomdir_file_lists_its_referenced_images():
    dicomdir = get_testdata_file("DICOMDIR")
    found = io.discover(dicomdir)
    n = sum(s.n_instances for s in found)
    assert n > 0 and all(os.path.dirname(dicomdir) in s.instances[0].file for s in found)
    folder = io.discover(os.path.dirname(dicomdir))
    assert {s.series_instance_uid for s in found} <= {s.series_instance_uid for s in folder}
    assert folder.skipped.dicomdir                      # the index itself is not an image


# --------------------------------------------------------------------------- PNG / JPG
def test_png_natural_sort_rgb_and_spacing(tmp_path):
    n = 12
    files = synth.write_png_slices(tmp_path, n=n, shape=(10, 14), rgb=True)
    assert sorted(p.name for p in files) != [p.name for p in files]     # lexical order differs
    found = io.discover(tmp_path)
    s = io.select(found)
    assert s.kind == "images" and [Path(r.file).name for r in s.instances] == [p.name for p in files]
    vol = io.load(s, spacing=(0.5, 0.6, 2.0))
    assert vol.windowed and vol.shape == (n, 10, 14) and vol.image.GetPixelID() == sitk.sitkFloat32
    assert vol.image.GetSpacing() == (0.5, 0.6, 2.0)
    for k in range(n):
        np.testing.assert_array_equal(vol.array[k], synth.png_slice_values(k, (10, 14)))
    assert io.load(s).image.GetSpacing() == (1.0, 1.0, 1.0)


def test_single_jpg_is_a_one_slice_input(tmp_path):
    (p,) = synth.write_png_slices(tmp_path, names=["only"], ext="jpg", shape=(16, 16))
    vol = io.load(io.select(io.discover(p)))
    assert vol.shape == (1, 16, 16) and vol.windowed
    np.testing.assert_allclose(vol.array[0], synth.png_slice_values(0, (16, 16)), atol=3)  # JPEG


def test_natural_key():
    names = ["slice10.png", "slice2.png", "Slice1.png", "slice1b.png"]
    assert sorted(names, key=natural_key) == ["Slice1.png", "slice1b.png", "slice2.png", "slice10.png"]


def test_dicom_preferred_over_images(tmp_path):
    synth.write_png_slices(tmp_path / "png", n=3)
    synth.write_ct_series(tmp_path / "dcm", shape=(3, 8, 8))
    found = io.discover(tmp_path)
    chosen = io.select(found)
    assert chosen.kind == "dicom"
    other = next(s for s in found if s.kind == "images")
    assert "not DICOM" in other.reason


# --------------------------------------------------------------------------- NIfTI
def test_nifti_ras_to_lps(tmp_path):
    import nibabel as nib  # nibabel: imported by the tests that read NIfTI, not at collection

    hu = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 30
    d = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])   # a sagittal-like frame
    p = synth.write_nifti(tmp_path / "v.nii.gz", hu, spacing=(0.5, 0.75, 2.0),
                          origin=(10.0, -20.0, 30.0), direction=d)
    found = io.discover(p)
    vol = io.load(io.select(found))
    assert vol.image.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    assert vol.image.GetSpacing() == pytest.approx((0.5, 0.75, 2.0))
    np.testing.assert_allclose(np.reshape(vol.image.GetDirection(), (3, 3)), d, atol=1e-6)
    np.testing.assert_array_equal(vol.array, hu)
    # independent: nibabel's RAS affine maps voxel (i, j, k) to the same point as our LPS image
    aff = nib.load(str(p)).affine
    for ijk in [(0, 0, 0), (4, 3, 2), (1, 2, 0)]:
        ras = aff @ np.array([*ijk, 1.0])
        lps = vol.image.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-5)
    assert not vol.windowed and vol.warnings == []


def test_nifti_4d_is_not_a_volume(tmp_path):
    import nibabel as nib

    p = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), p)
    found = io.discover(p)
    assert not found[0].usable and "4-D" in found[0].unusable_reason
    with pytest.raises(NoSeriesFound):
        io.select(found)


# --------------------------------------------------------------------------- CLI
def test_cli_series_table_and_json(tmp_path, capsys):
    study = "1.2.3.4.5"
    synth.write_ct_series(tmp_path, shape=(5, 8, 8), study_uid=study, series_number=4,
                          description="axial thin", subfolder="a")
    synth.write_scout(tmp_path / "b", study)
    assert main(["series", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "* s4" in out and "chosen: s4" in out and "localizer" in out
    assert "Synthetic^Phantom" not in out
    assert main(["series", str(tmp_path), "--json", "--include-phi"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chosen"] == "s4" and len(d["series"]) == 2
    assert {s["patient_name"] for s in d["series"]} == {"Synthetic^Phantom"}


def test_cli_series_no_ct_exits_2(tmp_path, capsys):
    synth.write_sr(tmp_path)
    assert main(["series", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No usable CT series" in err and "structured report" in err and "Traceback" not in err


def test_missing_path(tmp_path):
    with pytest.raises(UnsupportedInput, match="does not exist"):
        io.discover(tmp_path / "nope")


def test_equal_image_folders_need_an_explicit_choice(tmp_path):
    synth.write_png_slices(tmp_path / "malignant", n=4)
    synth.write_png_slices(tmp_path / "normal", n=4)
    found = io.discover(tmp_path)
    with pytest.raises(NoSeriesFound, match="2 image folders .* equally good.*malignant.*normal"):
        io.select(found)
    key = next(s.key for s in found if "normal" in s.series_description)
    assert "normal" in io.select(found, series=key).series_description
    synth.write_png_slices(tmp_path / "normal", n=6)          # now one folder is the longer series
    assert "normal" in io.select(io.discover(tmp_path)).series_description
