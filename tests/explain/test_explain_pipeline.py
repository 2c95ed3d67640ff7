"""Grad-CAM inside ``analyze``: an oblique DICOM series, slabbed and resampled by the bundle's
spec, gets a CamStack whose 3D maps lie on the CT grid, and the run folder's
``cam_<label>.nii.gz`` carry exactly the affine of ``ct.nii.gz``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from synth import write_ct_series
from tiny_bundle import make_bundle

import dicompipe
from dicompipe import report
from dicompipe.types import PreprocessSpec


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam-pipeline")
    a, b = math.radians(12), math.radians(8)
    direction = (np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
                 @ np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]]))
    write_ct_series(root / "ct", shape=(9, 40, 52), spacing=(0.8, 0.85, 1.25),
                    origin=(-20.0, -17.0, 50.0), direction=direction)
    spec = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)],
                          size=64, spacing=1.1, slab_mm=2.5)
    bundle = make_bundle(root / "bundle", organ="lung", spec=spec, trained=True)
    return dicompipe.analyze(root / "ct", organ="lung", model=str(bundle),
                             select_slices=False, device="cpu", backend="torch"), root


def test_analysis_carries_cams_for_every_slice_and_class(analysis):
    a, _ = analysis
    cams = a.cams
    n = len(a.batch.included)
    assert cams is not None and cams.method == "gradcam"
    assert cams.labels == a.predictions.labels
    assert cams.maps.shape == (n, 3, 2, 2)            # 64 px input -> layer4 2x2
    for label in cams.labels:
        img = cams.volumes[label]
        assert img.GetSize() == a.volume.image.GetSize()
        assert img.GetOrigin() == a.volume.image.GetOrigin()
        assert img.GetSpacing() == a.volume.image.GetSpacing()
        assert img.GetDirection() == a.volume.image.GetDirection()
        assert cams.scale[label] == pytest.approx(float(cams.maps[:, cams.labels.index(label)].max()))
    d = a.to_dict()["cams"]
    assert d["method"] == "gradcam" and set(d["scale"]) == set(cams.labels)


def test_run_folder_nifti_pair_shares_the_affine(analysis, tmp_path):
    import nibabel as nib  # nibabel: imported by the tests that read NIfTI, not at collection

    a, _ = analysis
    run = report.write(a, tmp_path, formats=["nifti"], cam_nifti="all", ct_nifti=True)
    ct = nib.load(run / "ct.nii.gz")
    for label in a.cams.labels:
        cam = nib.load(run / f"cam_{label}.nii.gz")
        assert np.array_equal(cam.affine, ct.affine)
        assert cam.shape == ct.shape
    # RAS = LPS with x, y negated, voxel (0, 0, 0) at the CT origin
    o = np.asarray(a.volume.image.GetOrigin())
    assert np.allclose(ct.affine[:3, 3], o * [-1, -1, 1], atol=1e-3)
