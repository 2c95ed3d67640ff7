"""Check the io stage on the real DICOM sets beside the project (../shared/data):

- abdomen-ct-dicom/series (JPEG 2000 lossless, EMPTY Study/Series/SOP UIDs in the data sets)
- lidc-idri-0001 (uncompressed, complete UIDs, patient/study/series folders)

For each: discover + select + load, then compare with SimpleITK's ImageSeriesReader (GDCM)
on the same files in the same order: origin, spacing and direction within 1e-4 mm, voxels
equal. For the abdomen, also check that the volume lies on exactly the grid of
``reference_segmentation.nii.gz`` (TotalSegmentator labels; see check_segmentation_grid),
and that the organ labels fall on soft tissue in HU.

Usage::

    python benchmarks/check_real_data.py [DATA_DIR]      # default: ../shared/data

Exits 0 when every check passes, 1 when one fails, and 0 with "skipped" when the data are
absent (a fresh machine).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicompipe import io
from dicompipe.io.nifti import lps_affine

TOL_MM = 1e-4


def sitk_reference(vol) -> sitk.Image:
    files = [refs[0].file for refs in vol.slices]
    r = sitk.ImageSeriesReader()
    r.SetFileNames(files)
    return r.Execute()


def compare(name: str, path: Path) -> tuple[bool, object]:
    t = time.perf_counter()
    found = io.discover(path)
    chosen = io.select(found)
    vol = io.load(chosen)
    dt = time.perf_counter() - t
    t = time.perf_counter()
    ref = sitk_reference(vol)
    dt_ref = time.perf_counter() - t
    d_origin = np.abs(np.subtract(vol.image.GetOrigin(), ref.GetOrigin())).max()
    d_spacing = np.abs(np.subtract(vol.image.GetSpacing(), ref.GetSpacing())).max()
    d_dir = np.abs(np.subtract(vol.image.GetDirection(), ref.GetDirection())).max()
    a, b = vol.array, sitk.GetArrayFromImage(ref).astype(np.float64)
    same_shape = a.shape == b.shape
    d_vox = float(np.abs(a - b).max()) if same_shape else float("inf")
    ok = d_origin <= TOL_MM and d_spacing <= TOL_MM and d_dir <= 1e-6 and d_vox == 0.0
    print(f"[{'OK' if ok else 'FAIL'}] {name}: {path}")
    print(f"  candidates: {[(s.key, s.kind, s.n_instances, s.usable) for s in found]}")
    print(f"  chosen: {chosen.key} - {chosen.reason}")
    print(f"  series UID: {chosen.series_instance_uid!r}  transfer syntax: {chosen.transfer_syntax}")
    print(f"  loaded {vol.shape} (z, y, x) {vol.image.GetPixelIDTypeAsString()} in {dt:.2f} s; "
          f"HU range {a.min():.0f}..{a.max():.0f} (SimpleITK ImageSeriesReader on the same files: "
          f"{dt_ref:.2f} s)")
    print(f"  origin  {tuple(round(v, 6) for v in vol.image.GetOrigin())}  |diff| {d_origin:.2e} mm")
    print(f"  spacing {tuple(round(v, 6) for v in vol.image.GetSpacing())}  |diff| {d_spacing:.2e} mm")
    print(f"  direction {tuple(round(v, 6) for v in vol.image.GetDirection())}  |diff| {d_dir:.2e}")
    print(f"  voxels vs SimpleITK: shape {'equal' if same_shape else 'DIFFERENT'}, max |diff| {d_vox}")
    print(f"  first/last slice: {Path(vol.slices[0][0].file).name} (InstanceNumber "
          f"{vol.slices[0][0].instance_number}) .. {Path(vol.slices[-1][0].file).name} "
          f"(InstanceNumber {vol.slices[-1][0].instance_number})")
    for w in chosen.warnings + vol.warnings:
        print(f"  warning: {w}")
    return ok, vol


def check_segmentation_grid(vol, seg_path: Path) -> bool:
    """Same grid after converting properly: the NIfTI is stored LAS (its rows run P->A, the
    DICOM rows A->P), so compare lattices, not raw affines. nibabel's RAS affine is turned
    into LPS; the index map from the NIfTI grid to the volume grid must be a signed
    permutation with integer offsets covering exactly the volume's index ranges. The labels
    are then reoriented with SimpleITK (DICOMOrient to the volume's direction) and must
    overlay soft tissue."""
    import nibabel as nib
    nimg = nib.load(str(seg_path))
    lps_nifti = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(nimg.affine, float)   # RAS -> LPS
    m = np.linalg.inv(lps_affine(vol.image)) @ lps_nifti        # NIfTI (i, j, k) -> volume (x, y, z)
    perm = np.round(m[:3, :3])
    lattice_ok = (np.abs(m[:3, :3] - perm).max() <= TOL_MM and
                  np.all(np.abs(perm).sum(0) == 1) and np.all(np.abs(perm).sum(1) == 1) and
                  np.abs(m[:3, 3] - np.round(m[:3, 3])).max() <= TOL_MM)
    corners = np.array([[0, 0, 0, 1], [*(np.array(nimg.shape[:3]) - 1), 1]], float) @ m.T
    lo, hi = np.round(corners[:, :3].min(0)), np.round(corners[:, :3].max(0))
    size_xyz = np.array(vol.image.GetSize())
    covers = bool(np.all(lo == 0) and np.all(hi == size_xyz - 1))
    seg = sitk.ReadImage(str(seg_path))
    code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(vol.image.GetDirection())
    seg = sitk.DICOMOrient(seg, code)
    geo = (np.abs(np.subtract(seg.GetOrigin(), vol.image.GetOrigin())).max(),
           np.abs(np.subtract(seg.GetSpacing(), vol.image.GetSpacing())).max(),
           np.abs(np.subtract(seg.GetDirection(), vol.image.GetDirection())).max())
    same = seg.GetSize() == vol.image.GetSize() and max(geo) <= TOL_MM
    labels, hu = sitk.GetArrayFromImage(seg), vol.array
    stats = {}
    for lab, organ in ((7, "pancreas"), (5, "liver"), (1, "spleen"), (6, "stomach")):
        mask = labels == lab
        if mask.any():
            stats[organ] = (int(mask.sum()), float(np.median(hu[mask])))
    soft = all(-50.0 < med < 300.0 for _, med in stats.values())
    ok = lattice_ok and covers and same and soft and "pancreas" in stats
    print(f"[{'OK' if ok else 'FAIL'}] abdomen volume vs {seg_path.name} (stored "
          f"{''.join(nib.aff2axcodes(nimg.affine))} in nibabel's RAS+ codes, volume is {code} in "
          f"SimpleITK's codes)")
    print(f"  NIfTI index -> volume index: signed permutation {perm.astype(int).tolist()}, offset "
          f"{np.round(m[:3, 3], 6).tolist()}: lattice {'identical' if lattice_ok else 'DIFFERENT'}, "
          f"covers the volume exactly: {covers}")
    print(f"  reoriented labels: size {seg.GetSize()} vs {vol.image.GetSize()}, |origin| {geo[0]:.1e} mm, "
          f"|spacing| {geo[1]:.1e} mm, |direction| {geo[2]:.1e}")
    print("  median HU inside labels: " + ", ".join(f"{o} {med:.0f} HU ({n} voxels)"
                                                 for o, (n, med) in stats.items()))
    return ok


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = Path(argv[0]) if argv else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    abdomen, lidc = data / "abdomen-ct-dicom", data / "lidc-idri-0001"
    if not abdomen.is_dir() and not lidc.is_dir():
        print(f"skipped: no real data under {data}")
        return 0
    results = []
    if abdomen.is_dir():
        ok, vol = compare("abdomen-ct-dicom (JPEG 2000, empty UIDs)", abdomen / "series")
        results.append(ok)
        seg = abdomen / "reference_segmentation.nii.gz"
        if seg.is_file():
            results.append(check_segmentation_grid(vol, seg))
    if lidc.is_dir():
        ok, _ = compare("lidc-idri-0001 (uncompressed)", lidc)
        results.append(ok)
    print("ALL CHECKS PASSED" if all(results) else "SOME CHECKS FAILED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
