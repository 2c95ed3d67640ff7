"""to_volume through the real io.load + preprocess.prepare: an oblique DICOM series, thin
slices averaged into slabs, in-plane resampled, non-square (padded). A bright sphere at a
known LPS point goes forward to model tensors and back: it must land where it was, and the
CAM NIfTI must carry the CT NIfTI's affine (RAS = LPS with x, y negated).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from synth import write_ct_series

from dicompipe import io
from dicompipe.preprocess import prepare, to_volume
from dicompipe.report.nifti import write_nifti
from dicompipe.types import PreprocessSpec

CENTRE = np.array([4.0, -3.0, 41.0])         # LPS mm
RADIUS = 5.0


def sphere(x, y, z):
    d2 = (x - CENTRE[0]) ** 2 + (y - CENTRE[1]) ** 2 + (z - CENTRE[2]) ** 2
    return np.where(d2 <= RADIUS ** 2, 200.0, -1000.0)


def oblique():
    a, b = math.radians(15), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oblique")
    write_ct_series(folder, shape=(17, 36, 48), spacing=(0.8, 0.9, 1.25),
                    origin=(-15.0, -18.0, 30.0), direction=oblique(), hu=sphere)
    vol = io.load(io.select(io.discover(folder)))
    # window (0, 400): air -> 0, sphere -> 1 (after undoing the normalisation below)
    spec = PreprocessSpec(windows=[(0.0, 400.0)], size=40, spacing=1.3, slab_mm=2.5)
    batch = prepare(vol, spec, select_slices=False)
    return vol, batch


def centroid_lps(img):
    a = sitk.GetArrayFromImage(img).astype(np.float64)
    zz, yy, xx = np.indices(a.shape)
    w = a.sum()
    idx = [float((xx * a).sum() / w), float((yy * a).sum() / w), float((zz * a).sum() / w)]
    return np.array(img.TransformContinuousIndexToPhysicalPoint(idx))


def test_batch_is_oblique_slabbed_resampled_padded(case):
    vol, batch = case
    assert not np.allclose(np.reshape(vol.image.GetDirection(), (3, 3)), np.eye(3))
    assert batch.grid.GetSize()[2] < vol.image.GetSize()[2]          # slabs
    assert batch.grid.GetSpacing()[0] == pytest.approx(1.3)           # resampled in-plane
    assert batch.pad[0] > 0                                            # padded rows


def test_sphere_comes_back_to_its_lps_position(case):
    vol, batch = case
    spec = batch.spec
    maps = batch.tensors[:, 0] * spec.std + spec.mean                  # back to [0, 1] window
    out = to_volume(batch, maps)
    assert out.GetSize() == vol.image.GetSize()
    assert out.GetOrigin() == vol.image.GetOrigin()
    assert out.GetSpacing() == vol.image.GetSpacing()
    assert out.GetDirection() == vol.image.GetDirection()
    assert np.linalg.norm(centroid_lps(out) - CENTRE) < 0.6
    # a coarse (layer4-like, 8x8) map still peaks in the sphere
    coarse = maps.reshape(len(maps), 8, 5, 8, 5).mean(axis=(2, 4))
    a = sitk.GetArrayFromImage(to_volume(batch, coarse))
    peak = np.unravel_index(np.argmax(a), a.shape)
    p = np.array(vol.image.TransformIndexToPhysicalPoint([int(i) for i in peak[::-1]]))
    assert np.linalg.norm(p - CENTRE) <= RADIUS


def test_cam_nifti_has_the_ct_affine_and_ras_position(case, tmp_path):
    import nibabel as nib  # nibabel: imported by the tests that read NIfTI, not at collection

    vol, batch = case
    spec = batch.spec
    cam = to_volume(batch, batch.tensors[:, 0] * spec.std + spec.mean)
    ct_p = write_nifti(vol.image, tmp_path / "ct.nii.gz", dtype=np.int16)
    cam_p = write_nifti(cam, tmp_path / "cam_malignant.nii.gz")
    ct, cm = nib.load(ct_p), nib.load(cam_p)
    assert np.array_equal(ct.affine, cm.affine)
    assert np.array_equal(ct.header.get_qform(), cm.header.get_qform())
    # the CAM's centre of mass in nibabel's RAS world is the sphere centre with x, y negated
    data = np.asarray(cm.dataobj, dtype=np.float64)
    ijk = np.array([(np.indices(data.shape)[d] * data).sum() / data.sum() for d in range(3)])
    ras = cm.affine @ np.append(ijk, 1.0)
    assert np.allclose(ras[:3], CENTRE * [-1, -1, 1], atol=0.6)


def test_volume_slices_outside_analysed_slabs_are_zero(case):
    vol, batch = case
    maps = np.ones((len(batch.included), 4, 4), np.float32)
    covered = sorted({z for s in batch.included for z in s.volume_z})
    a = sitk.GetArrayFromImage(to_volume(batch, maps))
    others = [z for z in range(a.shape[0]) if z not in covered]
    assert others, "17 slices in 2-slice slabs leave one edge slice out"
    assert np.all(a[others] == 0)
    assert a[covered].max() == pytest.approx(1.0)
