"""preprocess.inverse.to_volume and report.nifti.write_nifti: maps go back onto the exact CT grid.

The SliceBatch here is built by hand from the contract in types.py (SimpleITK resample to
the model grid, square pad, bilinear resize), so a known object's position can be followed
through the forward transform and back.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from geometry import OBLIQUE, blob, centroid_lps, make_batch, make_volume, rotation

from dicompipe.errors import PreprocessError, ReportError
from dicompipe.preprocess.inverse import to_grid, to_slice, to_volume, to_volume_uint8
from dicompipe.report.nifti import nifti_affine, write_nifti
from dicompipe.types import ModelSlice, PreprocessSpec, SliceBatch


@pytest.fixture
def oblique_case():
    """Oblique, anisotropic, non-square CT with one blob; resampled grid, padded slices."""
    shape = (24, 40, 56)                       # z, y, x: rows < columns -> padded vertically
    arr = blob(shape, (11, 17, 33), (3, 6, 7))
    vol = make_volume(arr * 100.0, spacing=(0.7, 0.8, 2.5), direction=OBLIQUE)
    spec = PreprocessSpec(size=32, spacing=1.1, slab_mm=3.0)
    batch, g = make_batch(vol, spec, skip=(0, 1))
    return vol, batch, g


def test_round_trip_puts_blob_back_where_it_was(oblique_case):
    vol, batch, g = oblique_case
    assert batch.pad[0] > 0 and batch.pad[1] == 0          # padded, and really resampled
    assert batch.grid.GetSpacing() != vol.image.GetSpacing()
    maps = batch.tensors[:, 0]                              # the rendered slices as "maps"
    out = to_volume(batch, maps)
    # exact source geometry
    assert out.GetSize() == vol.image.GetSize()
    assert out.GetOrigin() == vol.image.GetOrigin()
    assert out.GetSpacing() == vol.image.GetSpacing()
    assert out.GetDirection() == vol.image.GetDirection()
    # the blob comes back at its physical place (to well under a voxel)
    err = np.linalg.norm(centroid_lps(out) - centroid_lps(vol.image))
    assert err < 0.5, err
    a, b = sitk.GetArrayFromImage(out).ravel(), vol.array.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.85


def test_layer4_resolution_maps_land_on_the_blob(oblique_case):
    import torch  # here, not at the top: importing torch at collection is slow
    import torch.nn.functional as F

    vol, batch, _ = oblique_case
    # a coarse map like layer4's: average-pool the rendered slices 32 -> 8 (stride 4)
    coarse = F.avg_pool2d(torch.from_numpy(batch.tensors[:, :1]), 4)[:, 0].numpy()
    out = to_volume(batch, coarse)
    a = sitk.GetArrayFromImage(out)
    peak = np.unravel_index(np.argmax(a), a.shape)
    assert vol.array[peak] > 0                               # the CAM peak lies in the blob
    err = np.linalg.norm(centroid_lps(out) - centroid_lps(vol.image))
    assert err < 2.0, err


def test_skipped_slices_stay_zero_and_maps_follow_rows(oblique_case):
    _, batch, g = oblique_case
    n = len(batch.included)
    maps = np.ones((n, 4, 4), np.float32) * np.arange(1, n + 1, dtype=np.float32)[:, None, None]
    grid = to_grid(batch, maps)
    assert grid.shape == g.shape
    assert np.all(grid[[0, 1]] == 0)
    for s in batch.included:                                   # constant map k -> value k+1 there
        assert np.allclose(grid[s.z], s.row + 1)


def test_edge_rim_is_covered_not_zeroed():
    vol = make_volume(np.zeros((10, 20, 20)), spacing=(1.0, 1.0, 1.0))
    spec = PreprocessSpec(size=16, spacing=1.5, slab_mm=3.0)
    batch, _ = make_batch(vol, spec)
    out = sitk.GetArrayFromImage(to_volume(batch, np.ones((len(batch.included), 2, 2))))
    assert out.min() > 0.99                      # ones everywhere, including the last rows/slices


def test_separable_and_resample_paths_agree(oblique_case):
    """Both paths reproduce a linear map exactly (any linear interpolation does), so any
    geometric mismatch between them would show; peaks differ only by interpolation smoothing."""
    import torch
    import torch.nn.functional as F

    vol, _, _ = oblique_case
    batch, _ = make_batch(vol, PreprocessSpec(size=32, spacing=1.1, slab_mm=3.0))
    ii, jj = np.mgrid[0:8, 0:8].astype(np.float32)
    ramp = np.repeat((1.0 + 0.3 * ii + 0.2 * jj)[None], len(batch.included), axis=0)
    fast = sitk.GetArrayFromImage(to_volume(batch, ramp, method="separable"))
    slow = sitk.GetArrayFromImage(to_volume(batch, ramp, method="resample"))
    core = (slice(3, -3), slice(10, -10), slice(12, -12))      # away from clamped borders
    assert fast[core].min() > 1.0
    assert np.abs(fast[core] - slow[core]).max() < 1e-3
    coarse = F.avg_pool2d(torch.from_numpy(batch.tensors[:, :1]), 4)[:, 0].numpy()
    pf, ps = (np.unravel_index(np.argmax(sitk.GetArrayFromImage(to_volume(batch, coarse, method=m))),
                               fast.shape) for m in ("separable", "resample"))
    assert np.abs(np.subtract(pf, ps)).max() <= 1


def test_one_slice_equals_that_slice_of_the_volume(oblique_case):
    """to_slice (what report images and the viewer use) = to_volume's slice, skipped and
    uncovered slices included; the CamStack keeps no volume for it."""
    from dicompipe.explain import cam_slice
    from dicompipe.explain.gradcam import CamVolumes
    from dicompipe.types import CamStack

    vol, batch, _ = oblique_case
    maps = batch.tensors[:, 0]
    full = sitk.GetArrayFromImage(to_volume(batch, maps))
    for z in range(full.shape[0]):
        assert np.allclose(to_slice(batch, maps, z), full[z], atol=1e-5)
    cams = CamStack(labels=["x"], maps=maps[:, None], scale={"x": 1.0})
    cams.volumes = CamVolumes(batch, maps[:, None], ["x"])
    assert np.allclose(cam_slice(cams, batch, "x", 11), full[11], atol=1e-5)
    assert cams.volumes.peek("x") is None
    with pytest.raises(PreprocessError, match="outside the volume"):
        to_slice(batch, maps, full.shape[0])


def test_uint8_volume_is_the_float_volume_quantised(oblique_case, tmp_path):
    """What cam_*.nii.gz store: the float volume within half a step, same geometry, and a
    NIfTI reader gets the values back through scl_slope."""
    import nibabel as nib

    vol, batch, _ = oblique_case
    maps = np.abs(batch.tensors[:, 0])                       # CAM maps are >= 0 (ReLU)
    full = sitk.GetArrayFromImage(to_volume(batch, maps))
    img, scale = to_volume_uint8(batch, maps, chunk=5)       # chunks that do not divide z
    assert img.GetPixelID() == sitk.sitkUInt8 and scale == pytest.approx(maps.max() / 255)
    for get in ("GetOrigin", "GetSpacing", "GetDirection", "GetSize"):
        assert getattr(img, get)() == getattr(vol.image, get)()
    assert np.abs(sitk.GetArrayFromImage(img) * scale - full).max() <= 0.5 * scale + 1e-5
    path = write_nifti(img, tmp_path / "cam.nii.gz", slope=scale)
    back = np.transpose(np.asarray(nib.load(path).dataobj, np.float32), (2, 1, 0))
    assert np.abs(back - full).max() <= 0.5 * scale + 1e-5


def test_grid_with_its_own_direction_uses_resample():
    """A grid rotated against the volume (not what prepare makes, but legal): still exact."""
    shape = (20, 32, 32)
    arr = blob(shape, (9, 12, 20), (3, 5, 5))
    vol = make_volume(arr, spacing=(1.0, 1.0, 2.0))
    rot = rotation(2, 25)
    grid = sitk.Resample(vol.image, [40, 40, 20], sitk.Transform(), sitk.sitkLinear,
                         (-130.0, -100.0, -300.0), (1.0, 1.0, 2.0), tuple(rot.ravel()), 0.0,
                         sitk.sitkFloat32)
    g = sitk.GetArrayFromImage(grid)
    slices = [ModelSlice(z=z, volume_z=[], sources=[], row=z) for z in range(g.shape[0])]
    batch = SliceBatch(tensors=g[:, None], slices=slices, spec=PreprocessSpec(size=40),
                       grid=grid, pad=(0, 0, 40), volume=vol)
    with pytest.raises(PreprocessError, match="direction"):
        to_volume(batch, g, method="separable")
    out = to_volume(batch, g)
    assert out.GetDirection() == vol.image.GetDirection()
    assert np.linalg.norm(centroid_lps(out) - centroid_lps(vol.image)) < 0.5


def test_errors_are_clear(oblique_case):
    _, batch, _ = oblique_case
    with pytest.raises(PreprocessError, match="one 2D map per included slice"):
        to_volume(batch, np.zeros((3, 7, 7)))
    bad = SliceBatch(tensors=batch.tensors, slices=batch.slices, spec=batch.spec,
                     grid=batch.grid, pad=(5, 0, 10), volume=batch.volume)
    with pytest.raises(PreprocessError, match="pad"):
        to_grid(bad, np.zeros((len(batch.included), 7, 7)))


# --------------------------------------------------------------------------- NIfTI
def expected_ras_affine(img):
    """Voxel -> RAS from SimpleITK's own index -> LPS mapping (independent of nifti_affine)."""
    o = np.array(img.TransformIndexToPhysicalPoint((0, 0, 0)))
    cols = [np.array(img.TransformIndexToPhysicalPoint(e)) - o
            for e in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    aff = np.eye(4)
    aff[:3, :3] = np.stack(cols, 1)
    aff[:3, 3] = o
    aff[:2] *= -1                                            # LPS -> RAS
    return aff


def test_ct_and_cam_nifti_share_the_affine(tmp_path, oblique_case):
    import nibabel as nib  # nibabel: imported by the tests that read NIfTI, not at collection

    vol, batch, _ = oblique_case
    cam = to_volume(batch, batch.tensors[:, 0])
    p_ct = write_nifti(vol.image, tmp_path / "ct.nii.gz", dtype=np.int16)
    p_cam = write_nifti(cam, tmp_path / "cam_lesion.nii.gz", description="Grad-CAM lesion",
                        display_range=(0.0, 1.0))
    ct, cm = nib.load(p_ct), nib.load(p_cam)
    assert np.array_equal(ct.affine, cm.affine)
    assert np.array_equal(ct.get_qform(), cm.get_qform())
    assert int(ct.header["sform_code"]) == 1 and int(ct.header["qform_code"]) == 1
    assert np.allclose(ct.affine, expected_ras_affine(vol.image), atol=1e-4)
    assert np.allclose(ct.get_qform(), ct.get_sform(), atol=1e-4)   # qform agrees (oblique)
    assert ct.get_data_dtype() == np.int16 and cm.get_data_dtype() == np.float32
    assert float(cm.header["cal_max"]) == 1.0
    # voxel order: sitk (z, y, x) array == nibabel (i, j, k) data transposed
    assert np.array_equal(np.asarray(cm.dataobj), sitk.GetArrayFromImage(cam).transpose(2, 1, 0))
    # ITK reads it back on the same LPS grid
    back = sitk.ReadImage(str(p_cam))
    assert np.allclose(back.GetOrigin(), vol.image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetDirection(), vol.image.GetDirection(), atol=1e-5)
    assert np.allclose(back.GetSpacing(), vol.image.GetSpacing(), atol=1e-5)


def test_nifti_world_coordinates_are_ras():
    img = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    img.SetOrigin((10.0, 20.0, 30.0))
    img.SetSpacing((0.5, 0.6, 2.0))
    aff = nifti_affine(img)
    lps = img.TransformIndexToPhysicalPoint((3, 4, 5))
    ras = aff @ np.array([3, 4, 5, 1.0])
    assert np.allclose(ras[:3], (-lps[0], -lps[1], lps[2]))


def test_nifti_bad_name_or_image(tmp_path):
    img = sitk.Image(2, 2, 2, sitk.sitkFloat32)
    with pytest.raises(ReportError, match="nii"):
        write_nifti(img, tmp_path / "ct.png")
    with pytest.raises(ReportError, match="3D"):
        write_nifti(sitk.Image(2, 2, sitk.sitkFloat32), tmp_path / "x.nii.gz")
