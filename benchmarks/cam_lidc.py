"""Grad-CAM on the real LIDC-IDRI-0001 slab: where does the malignant-class map point?

Reads ``../shared/data/lidc-idri-0001`` (skips cleanly when it is absent), runs the pipeline
stages (io -> prepare -> predict -> explain.gradcam), parses the LIDC readers' XML
(``annotations.xml``: per-slice ``edgeMap`` contours keyed by ``imageZposition`` /
``imageSOP_UID``), rasterises every reader's outline of each nodule on the CT grid, converts
pixel (column, row) -> LPS mm with the slice geometry, and reports the distance in mm from
the malignant-class 3D CAM peak to the nearest outlined nodule voxel and to the nodule centre.
Writes a PNG overlay (axial at the peak and at the nodule, coronal through the nodule) and
a JSON with the figures.

Weights: the built-in ``lung-resnet50`` bundle when installed, else ``--bundle PATH``, else
seeded random ResNet50 weights — the JSON says which; a random-weight distance says
nothing about the model, only that the measurement chain works.

Run: ``python -m benchmarks.cam_lidc [--data DIR] [--bundle PATH] [--out DIR]``
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "lidc-idri-0001"
NS = {"l": "http://www.nih.gov"}


def parse_lidc(xml_path: Path) -> list[dict]:
    """Readers' nodules: [{reader, nodule_id, malignancy, rois: [{z, sop, inclusion, points}]}]."""
    root = ET.parse(xml_path).getroot()
    out = []
    for r, session in enumerate(root.findall("l:readingSession", NS)):
        for nod in session.findall("l:unblindedReadNodule", NS):
            mal = nod.find("l:characteristics/l:malignancy", NS)
            rois = []
            for roi in nod.findall("l:roi", NS):
                pts = [(float(e.find("l:xCoord", NS).text), float(e.find("l:yCoord", NS).text))
                       for e in roi.findall("l:edgeMap", NS)]
                rois.append({"z": float(roi.find("l:imageZposition", NS).text),
                             "sop": (roi.find("l:imageSOP_UID", NS).text or "").strip(),
                             "inclusion": (roi.find("l:inclusion", NS).text or "TRUE").strip().upper() == "TRUE",
                             "points": pts})
            out.append({"reader": r, "nodule_id": nod.find("l:noduleID", NS).text.strip(),
                        "malignancy": int(mal.text) if mal is not None and mal.text else None,
                        "rois": rois})
    return out


def nodule_masks(volume, nodules: list[dict]) -> list[dict]:
    """Rasterise each reader's nodule on the volume grid (ROIs matched by SOP UID, else z)."""
    from skimage.draw import polygon, polygon_perimeter
    img = volume.image
    nz, ny, nx = volume.shape
    sop_to_z = {ref.sop_instance_uid: z for z, refs in enumerate(volume.slices)
                for ref in refs if ref.sop_instance_uid}
    z_pos = np.array([img.TransformIndexToPhysicalPoint((0, 0, z))[2] for z in range(nz)])
    found = []
    for nod in nodules:
        mask = np.zeros((nz, ny, nx), bool)
        for roi in nod["rois"]:
            z = sop_to_z.get(roi["sop"])
            if z is None:
                k = int(np.argmin(np.abs(z_pos - roi["z"])))
                if abs(z_pos[k] - roi["z"]) > 0.5 * abs(img.GetSpacing()[2]):
                    continue                                # outside this slab
                z = k
            xs = np.array([p[0] for p in roi["points"]])
            ys = np.array([p[1] for p in roi["points"]])
            if len(xs) >= 3:
                rr, cc = polygon(ys, xs, (ny, nx))
                pr, pc = polygon_perimeter(ys, xs, (ny, nx))
                rr, cc = np.concatenate([rr, pr]), np.concatenate([cc, pc])
            else:
                rr, cc = np.clip(ys.astype(int), 0, ny - 1), np.clip(xs.astype(int), 0, nx - 1)
            mask[z, rr, cc] = roi["inclusion"]
        if mask.any():
            found.append({**{k: nod[k] for k in ("reader", "nodule_id", "malignancy")},
                          "mask": mask})
    return found


def lps_points(img: sitk.Image, idx_zyx: np.ndarray) -> np.ndarray:
    """(n, 3) z, y, x voxel indices -> (n, 3) LPS mm (the image's own geometry)."""
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ijk = idx_zyx[:, ::-1].astype(np.float64) * np.asarray(img.GetSpacing())
    return np.asarray(img.GetOrigin()) + ijk @ d.T


def get_bundle(path: str | None, work: Path):
    from dicompipe import model as model_stage
    if path:
        b = model_stage.load_bundle(path, organ="lung", allow_untrained=True)
        return b, f"bundle {b.name} {b.version} from {path} (trained={b.trained})"
    try:
        b = model_stage.load_bundle("lung-resnet50", organ="lung", allow_untrained=True)
        return b, f"built-in bundle {b.name} {b.version} (trained={b.trained})"
    except Exception as e:                                       # noqa: BLE001 - fall back
        why = str(e).split(".")[0]
    from benchmarks.cam import get_bundle as random_bundle
    b, _ = random_bundle(work)
    return b, f"seeded random ResNet50 weights (no lung bundle: {why}) - says nothing about a model"


def overlay_png(path: Path, volume, cam: sitk.Image, scale: float, masks, peak, centre_idx,
                title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dicompipe.preprocess.render import window

    ct = volume.array
    c = sitk.GetArrayFromImage(cam)
    union = np.any([m["mask"] for m in masks], axis=0) if masks else np.zeros(ct.shape, bool)
    sp = volume.image.GetSpacing()
    zc, yc, xc = centre_idx
    panels = [(f"axial at CAM peak z={peak[0]:d}", ct[peak[0]], c[peak[0]], union[peak[0]], peak[1:], 1.0),
              (f"axial at nodule z={zc:d}", ct[zc], c[zc], union[zc], (yc, xc), 1.0),
              (f"coronal through nodule y={yc:d}", ct[:, yc, :], c[:, yc, :], union[:, yc, :],
               (peak[0], peak[2]) if peak[1] == yc else None, sp[2] / sp[0])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6))
    for ax, (name, im, cm, mk, mark, aspect) in zip(axes, panels):
        ax.imshow(window(im, -600, 1500), cmap="gray", aspect=aspect, origin="upper")
        ax.imshow(np.ma.masked_less_equal(cm / scale if scale > 0 else cm, 0.05), cmap="jet",
                  vmin=0, vmax=1, alpha=0.45, aspect=aspect, origin="upper")
        if mk.any():
            ax.contour(mk, levels=[0.5], colors="lime", linewidths=1.2)
        if mark is not None and name.startswith("axial at CAM"):
            ax.plot(mark[1], mark[0], "w+", ms=14, mew=2)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--bundle", default=None, help="a lung bundle folder (default: built-in)")
    ap.add_argument("--label", default="malignant")
    ap.add_argument("--faithfulness", type=int, default=0, metavar="N",
                    help="also deletion/insertion AUCs on the N most malignant slices (slow on CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cam_lidc",
                    help="PNG overlay and JSON")
    ap.add_argument("--nifti-dir", type=Path, default=ROOT / "benchmarks" / "_work" / "cam_lidc",
                    help="ct.nii.gz and cam_<label>.nii.gz (open them together in a viewer)")
    args = ap.parse_args(argv)
    xml = args.data / "annotations.xml"
    if not xml.exists():
        print(f"skip: {args.data} not found (LIDC-IDRI-0001 lives in ../shared/data)")
        return None

    from dicompipe import explain, io, organs, preprocess
    from dicompipe.model import predict

    work = Path(tempfile.mkdtemp(prefix="cam-lidc-"))
    bundle, weights = get_bundle(args.bundle, work)
    vol = io.load(io.select(io.discover(args.data / "series")))
    sel = organs.get("lung").selection.rules()
    batch = preprocess.prepare(vol, bundle.spec, organ="lung", selection=sel)
    preds = predict(bundle, batch, backend="torch", device="cpu")
    cams = explain.gradcam(preds)
    label = args.label
    cam = cams.volumes[label]
    c = sitk.GetArrayFromImage(cam)
    peak = tuple(int(v) for v in np.unravel_index(np.argmax(c), c.shape))
    peak_lps = lps_points(vol.image, np.array([peak]))[0]

    nodules = nodule_masks(vol, parse_lidc(xml))
    rated = [n for n in nodules if n["malignancy"] is not None]
    target = [n for n in rated if n["malignancy"] >= 4] or rated
    if not target:
        print("no outlined nodule inside this slab")
        return None
    union = np.any([n["mask"] for n in target], axis=0)
    vox = np.argwhere(union)
    pts = lps_points(vol.image, vox)
    d_nodule = 0.0 if union[peak] else float(np.min(np.linalg.norm(pts - peak_lps, axis=1)))
    centre_lps = pts.mean(0)
    centre_idx = tuple(int(round(v)) for v in vox.mean(0))
    # the same with a check: the physical position of the nodule from the XML's own z values
    xml_z = sorted({roi["z"] for n in parse_lidc(xml) for roi in n["rois"]
                    if n["malignancy"] and n["malignancy"] >= 4})

    label_k = cams.labels.index(label)
    slice_peaks = cams.maps[:, label_k].max(axis=(1, 2))
    result = {
        "data": str(args.data),
        "weights": weights,
        "volume": {"shape_zyx": list(vol.shape), "spacing_xyz": list(vol.image.GetSpacing()),
                   "origin_lps": list(vol.image.GetOrigin())},
        "included_slices": len(batch.included),
        "label": label,
        "verdict_mean_probability": {l: round(float(p), 4) for l, p in
                                     zip(preds.labels, preds.probabilities.mean(0))},
        "cam_peak_index_zyx": list(peak),
        "cam_peak_lps_mm": [round(float(v), 2) for v in peak_lps],
        "nodule_readers": sorted({n["reader"] for n in target}),
        "nodule_malignancy": [n["malignancy"] for n in target],
        "nodule_xml_z_range_mm": [min(xml_z), max(xml_z)] if xml_z else None,
        "nodule_centre_lps_mm": [round(float(v), 2) for v in centre_lps],
        "nodule_voxels_union": int(union.sum()),
        "peak_inside_nodule": bool(union[peak]),
        "distance_peak_to_nodule_mm": round(d_nodule, 2),
        "distance_peak_to_nodule_centre_mm": round(float(np.linalg.norm(centre_lps - peak_lps)), 2),
        "cam_value_at_nodule_centre_over_scale": round(float(c[centre_idx] / cams.scale[label]), 3)
        if cams.scale[label] > 0 else 0.0,
        "hottest_slice_row": int(np.argmax(slice_peaks)),
    }
    if args.faithfulness:
        result["faithfulness"] = explain.volume_faithfulness(
            bundle, preds, cams, label, max_slices=args.faithfulness, steps=8)
    args.out.mkdir(parents=True, exist_ok=True)
    # the NIfTI pair a run folder holds: same affine, and the peak lands at the same RAS point
    import nibabel as nib

    from dicompipe.report.nifti import write_nifti
    ct_nii = nib.load(write_nifti(vol.image, args.nifti_dir / "ct.nii.gz", dtype=np.int16))
    cam_nii = nib.load(write_nifti(cam, args.nifti_dir / f"cam_{label}.nii.gz",
                                   display_range=(0.0, cams.scale[label])))
    ijk = np.unravel_index(np.argmax(np.asarray(cam_nii.dataobj)), cam_nii.shape)
    ras = cam_nii.affine @ np.array([*ijk, 1.0])
    result["nifti_affines_identical"] = bool(np.array_equal(ct_nii.affine, cam_nii.affine))
    result["nifti_cam_peak_ras_mm"] = [round(float(v), 2) for v in ras[:3]]
    result["nifti_dir"] = str(args.nifti_dir)
    overlay_png(args.out / "cam_lidc_overlay.png", vol, cam, cams.scale[label], target, peak,
                centre_idx, f"LIDC-IDRI-0001, Grad-CAM '{label}' (one scale per volume) - "
                            f"weights: {weights.split(' (')[0]}; green: readers' outlines")
    (args.out / "cam_lidc.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None or True else 1)
