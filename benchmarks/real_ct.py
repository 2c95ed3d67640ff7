"""Do the models look at the tumour? Every figure of the model issue on real DICOM.

For each bundle given (default: the built-in lung and pancreas bundles):

- **lung** on ``lung-pet-ct-dx-a0001`` (biopsy-proven adenocarcinoma, radiologists' boxes):
  the verdict; per-slice AUROC of P(malignant), tumour slices (z inside the boxes' z range
  +- half a slice) vs the rest, and the same for the malignant Grad-CAM's mass per slice;
  the malignant CAM peak (on the most malignant slice, and over the whole volume) against
  the boxes (inside with 10 mm in-plane and 5 mm z margin? distance in mm); on
  ``lidc-idri-0001`` the distance from the malignant CAM peak to the readers' outline
  (malignancy >= 4).
- **slice rankings on synthetic masses**: solid masses drawn into the lesion-free lung of
  ``lung-pet-ct-dx-a0001`` (``--mass-trials``); how P(malignant), P x the CAM's share in the
  lung fields and the pipeline's ranking (the CAM mass in the lung fields) rank the slices
  holding the mass (AUROC, the real tumour's slices left out).
- **CAM mass inside the body** on every key slice of the three shared series for the
  verdict's evidence class and for the positive class: the share of the slice's CAM (on the
  model's grid) inside an HU body mask made independently of the model (HU > -500,
  largest connected component, holes filled).
- **pancreas synthetic-lesion check** on ``abdomen-ct-dicom``: a hypo-attenuating lesion
  (20-60 HU darker, 8-30 mm, soft edge) is drawn into the pancreas of TotalSegmentator's
  label on one slice at a time; hit = the tumour CAM peak of that slice lies in the lesion.
  The ceiling beside it: how often a perfect map at the CAM's resolution (each cell = the
  lesion's share of it, upsampled the same way) peaks in the lesion. A bilinear map peaks
  on a cell centre, so with cells larger than the lesion even a perfect detector misses.

Run: ``python -m benchmarks.real_ct [--lung BUNDLE] [--pancreas BUNDLE] [--backend B] [--out FILE]``
(reads ``../shared/data``; skips what is missing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from benchmarks.cam_lidc import lps_points, nodule_masks, parse_lidc
from dicompipe import organs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SERIES = {"lung-pet-ct-dx-a0001": ("lung-pet-ct-dx-a0001/series", "lung"),
          "lidc-idri-0001": ("lidc-idri-0001/series", "lung"),
          "abdomen-ct-dicom": ("abdomen-ct-dicom/series", "pancreas")}


def hu_body(hu: np.ndarray) -> np.ndarray:
    """Independent body mask of an HU slice: > -500 HU, largest component, holes filled."""
    lab, n = ndimage.label(hu > -500)
    if n == 0:
        return np.zeros(hu.shape, bool)
    big = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(lab), lab, np.arange(1, n + 1))))
    return ndimage.binary_fill_holes(lab == big)


def grid_maps(a, label: str) -> np.ndarray:
    from dicompipe.preprocess.inverse import to_grid
    k = a.cams.labels.index(label)
    return to_grid(a.batch, a.cams.maps[:, k])


def grid_lps(grid: sitk.Image, zyx) -> np.ndarray:
    return np.asarray(grid.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def body_shares(a) -> dict:
    """Share of CAM mass inside the HU body on every key slice, for the verdict's evidence
    class and the positive class (min over key slices and the list)."""
    hu = sitk.GetArrayViewFromImage(a.batch.grid)
    out = {}
    ev = getattr(a.verdict, "evidence_label", None) or a.verdict.label
    pos = organs.get(a.organ).training.positive[0]
    for name, label in (("evidence", ev), ("positive", pos)):
        if label not in a.cams.labels:
            continue
        g = grid_maps(a, label)
        shares = []
        for ks in a.verdict.key_slices:
            m = g[ks.z]
            tot = float(m.sum())
            shares.append(round(float((m * hu_body(hu[ks.z])).sum()) / tot, 4) if tot > 0 else None)
        out[name] = {"label": label, "key_slice_z": [ks.z for ks in a.verdict.key_slices],
                     "shares": shares, "min": min([s for s in shares if s is not None], default=None)}
    return out


def analyse(path: Path, organ: str, bundle, backend: str = "auto"):
    import dicompipe
    return dicompipe.analyze(str(path), organ=organ, model=bundle, allow_untrained=True, backend=backend)


def verdict_summary(a) -> dict:
    return {"label": a.verdict.label, "probabilities": {k: round(v, 4) for k, v in a.verdict.probabilities.items()},
            "uncertain": a.verdict.uncertain, "key_slices_z": [k.z for k in a.verdict.key_slices]}


def lesion_slices(batch, z_lo: float, z_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(z in mm, holds the lesion) for each analysed slice of ``batch``: z within
    [``z_lo``, ``z_hi``] mm give or take half a slice."""
    grid = batch.grid
    half = abs(grid.GetSpacing()[2]) / 2
    z_mm = np.array([grid_lps(grid, (s.z, 0, 0))[2] for s in batch.included])
    return z_mm, (z_mm >= z_lo - half) & (z_mm <= z_hi + half)


def box_z_range(boxes_file: Path) -> tuple[float, float]:
    """The z range (mm) of the Lung-PET-CT-Dx tumour boxes."""
    zs = [v for b in json.loads(boxes_file.read_text())["boxes"] for v in (b["lps_min_mm"][2], b["lps_max_mm"][2])]
    return min(zs), max(zs)


def calibrated_p(a, label: str) -> np.ndarray:
    """The verdict's calibrated slice probabilities of ``label``."""
    from dicompipe.types import softmax
    return softmax(np.asarray(a.predictions.logits, np.float64) / a.verdict.temperature)[
        :, a.predictions.labels.index(label)]


def lung_tumour_check(a, boxes_file: Path) -> dict:
    """Per-slice AUROC and CAM peak vs the Lung-PET-CT-Dx tumour boxes."""
    from dicompipe.train.metrics import macro_auroc
    boxes = json.loads(boxes_file.read_text())["boxes"]
    grid = a.batch.grid
    k = a.predictions.labels.index("malignant")
    p = a.predictions.probabilities[:, k]
    z_mm, tumour = lesion_slices(a.batch, *box_z_range(boxes_file))
    both = 0 < tumour.sum() < len(p)
    auc = float(macro_auroc(tumour.astype(int), np.stack([1 - p, p], 1))) if both else None
    # the malignant Grad-CAM's mass per slice (ReLU'd, raw): the positive evidence alone,
    # without the head's bias and the competition with the other classes that P includes
    mass = a.cams.maps[:, a.cams.labels.index("malignant")].reshape(len(p), -1).mean(1)
    auc_mass = float(macro_auroc(tumour.astype(int), np.stack([-mass, mass], 1))) if both else None
    g = grid_maps(a, "malignant")

    def box_distance(pt):
        best = None
        for b in boxes:
            lo, hi = np.array(b["lps_min_mm"]), np.array(b["lps_max_mm"])
            d = np.maximum(0, np.maximum(lo - pt, pt - hi))
            inside = bool(d[0] <= 10 and d[1] <= 10 and d[2] <= 5)
            dist = float(np.linalg.norm(d))
            if best is None or dist < best[0]:
                best = (dist, inside)
        return {"lps_mm": [round(float(v), 1) for v in pt], "distance_to_nearest_box_mm": round(best[0], 1),
                "inside_box_with_margin": best[1]}

    top = a.batch.included[int(np.argmax(p))]
    peak2d, peak3d = _peak(g[top.z]), _peak(g)
    ranked = {}
    if (fk := _first_key_peak(a, g)) is not None:
        first, pk = fk
        key = np.asarray(a.verdict.region_evidence["malignant"])
        ranked = {"region": a.verdict.region,
                  "slice_auroc_cam_mass_in_region":
                      round(float(macro_auroc(tumour.astype(int), np.stack([-key, key], 1))), 4) if both else None,
                  "first_ranked_slice_z_mm": round(float(grid_lps(grid, (first.z, 0, 0))[2]), 1),
                  "cam_peak_first_ranked_slice": box_distance(grid_lps(grid, (first.z, *pk))),
                  "key_slices_holding_tumour": int(sum(bool(tumour[k.row]) for k in a.verdict.key_slices))}
    return {"n_slices": int(len(p)), "n_tumour_slices": int(tumour.sum()),
            "slice_auroc_malignant": None if auc is None else round(auc, 4),
            "slice_auroc_malignant_cam_mass": None if auc_mass is None else round(auc_mass, 4),
            "mean_p_malignant_tumour_slices": round(float(p[tumour].mean()), 4) if tumour.any() else None,
            "mean_p_malignant_other_slices": round(float(p[~tumour].mean()), 4) if (~tumour).any() else None,
            "most_malignant_slice_z_mm": round(float(z_mm[int(np.argmax(p))]), 1),
            "cam_peak_most_malignant_slice": box_distance(grid_lps(grid, (top.z, *peak2d))),
            "cam_peak_volume": box_distance(grid_lps(grid, peak3d)),
            "ranked_by_evidence_in_lung_fields": ranked}


def _peak(a: np.ndarray) -> tuple:
    """Index of the maximum of ``a`` (a slice's or the volume's Grad-CAM)."""
    return np.unravel_index(int(np.argmax(a)), a.shape)


def _first_key_peak(a, g: np.ndarray):
    """(first key slice, its malignant CAM peak) when the key slices show malignant evidence
    ranked by the pipeline (the malignant CAM mass inside the lung fields); else None."""
    if not (a.verdict.region_share and a.verdict.evidence == "malignant"):
        return None
    first = a.verdict.key_slices[0]
    return first, _peak(g[first.z])


def lung_mass_ranking_check(bundle, series: Path, boxes_file: Path, trials: int = 16, seed: int = 3,
                            radius_mm=(12.0, 25.0), backend: str = "auto") -> dict:
    """Draw one solid mass (0-40 HU, soft 0.8 mm edge, noise sd 25 HU) into the lesion-free
    lung of ``series`` per trial (>= 85 % of the ball in lung air, away from the real tumour's
    z range), analyse the CT as NIfTI and ask how each slice ranking ranks the slices that
    hold the mass (AUROC, the real tumour's slices left out): P(malignant), P x the CAM's
    share in the lung fields, and the pipeline's (the CAM mass in the lung fields)."""
    import tempfile

    from dicompipe.train.metrics import macro_auroc
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    img = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    hu0 = sitk.GetArrayFromImage(img)
    sp = np.array(img.GetSpacing())[::-1]                                  # z, y, x
    z_mm = np.array([img.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(hu0.shape[0])])
    t_lo, t_hi = box_z_range(boxes_file)
    lung = (hu0 < -400) & np.stack([hu_body(s) for s in hu0])
    far = (np.abs(z_mm - np.clip(z_mm, t_lo, t_hi)) > radius_mm[1] + sp[0])[:, None, None]
    cand = np.argwhere(lung & far)
    zz, yy, xx = (np.arange(n, dtype=np.float32)[s] for n, s in zip(
        hu0.shape, (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])))
    rng = np.random.default_rng(seed)
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="dicompipe-mass-"))
    for _ in range(trials):
        rad = float(rng.uniform(*radius_mm))
        for _ in range(200):
            c = cand[rng.integers(len(cand))]
            d = np.sqrt(((zz - c[0]) * sp[0]) ** 2 + ((yy - c[1]) * sp[1]) ** 2 + ((xx - c[2]) * sp[2]) ** 2)
            if lung[d < rad].mean() > 0.85:
                break
        w = 1 / (1 + np.exp(-(rad - d) / 0.8))
        hu = hu0 * (1 - w) + (rng.uniform(0, 40) + rng.normal(0, 25, hu0.shape)) * w
        out = sitk.GetImageFromArray(hu.astype(np.float32))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(tmp / "ct.nii.gz"))
        a = analyse(tmp / "ct.nii.gz", "lung", bundle, backend)
        p = calibrated_p(a, "malignant")
        gz = np.array([grid_lps(a.batch.grid, (s.z, 0, 0))[2] for s in a.batch.included])
        half = abs(a.batch.grid.GetSpacing()[2]) / 2
        holds = np.abs(gz - z_mm[c[0]]) <= rad + half
        keep = ~((gz >= t_lo - half) & (gz <= t_hi + half))
        keys = {"p": p, "p_x_share": p * np.asarray(a.verdict.region_share["malignant"]),
                "cam_mass_in_lung": np.asarray(a.verdict.region_evidence["malignant"])}
        rows.append({"radius_mm": round(rad, 1), "z_mm": round(float(z_mm[c[0]]), 1),
                     "slices_holding_mass": int(holds.sum()),
                     **{k: round(float(macro_auroc(holds[keep].astype(int), np.stack([-v[keep], v[keep]], 1))), 4)
                        for k, v in keys.items()}})
    shutil.rmtree(tmp, ignore_errors=True)
    return {"trials": rows, "mean_auroc": {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys},
            "mass_vs_p_x_share_wins_ties_losses": [
                sum(r["cam_mass_in_lung"] > r["p_x_share"] for r in rows),
                sum(r["cam_mass_in_lung"] == r["p_x_share"] for r in rows),
                sum(r["cam_mass_in_lung"] < r["p_x_share"] for r in rows)]}


def lidc_check(a, xml: Path) -> dict:
    """Distance from the malignant CAM peak (most malignant slice; whole volume) to the
    readers' outline of the malignancy >= 4 nodule."""
    nod = [n for n in nodule_masks(a.volume, parse_lidc(xml)) if (n["malignancy"] or 0) >= 4]
    if not nod:
        return {"error": "no outlined nodule with malignancy >= 4 in this slab"}
    union = np.any([n["mask"] for n in nod], axis=0)
    pts = lps_points(a.volume.image, np.argwhere(union))
    g = grid_maps(a, "malignant")
    k = a.predictions.labels.index("malignant")
    p = a.predictions.probabilities[:, k]
    top = a.batch.included[int(np.argmax(p))]

    def dist(pt):
        return round(float(np.min(np.linalg.norm(pts - pt, axis=1))), 1)

    peak2d, peak3d = _peak(g[top.z]), _peak(g)
    zs = sorted({round(float(v), 1) for v in pts[:, 2]})
    ranked = {}
    if (fk := _first_key_peak(a, g)) is not None:
        first, pk = fk
        ranked = {"region": a.verdict.region, "first_ranked_slice_z": first.z,
                  "cam_peak_first_ranked_slice_to_outline_mm": dist(grid_lps(a.batch.grid, (first.z, *pk))),
                  "share_in_region_per_slice": a.verdict.region_share["malignant"]}
    return {"nodule_z_mm": [zs[0], zs[-1]],
            "ranked_by_evidence_in_lung_fields": ranked,
            "p_malignant_per_slice": [round(float(v), 3) for v in p],
            "cam_peak_most_malignant_slice_to_outline_mm": dist(grid_lps(a.batch.grid, (top.z, *peak2d))),
            "cam_peak_volume_to_outline_mm": dist(grid_lps(a.batch.grid, peak3d))}


def lesion_trials(vol, seg: Path, trials: int = 20, seed: int = 0) -> list[dict]:
    """``trials`` hypo-attenuating lesions in the pancreas (TotalSegmentator label 7 of
    ``seg``), one slice each, cycling over the slices with > 50 pancreas voxels: z, centre,
    radius 4-15 mm, soft edge (1.5 mm), drop 20-60 HU, and ``alpha`` (the lesion's
    weight per pixel of that slice)."""
    lab = sitk.DICOMOrient(sitk.ReadImage(str(seg)), "LPS")
    lab = sitk.Resample(lab, vol.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    panc = sitk.GetArrayFromImage(lab) == 7
    zs = [z for z in range(panc.shape[0]) if panc[z].sum() > 50]
    rng = np.random.default_rng(seed)
    sp = vol.image.GetSpacing()
    yy, xx = np.mgrid[:panc.shape[1], :panc.shape[2]]
    out = []
    for t in range(trials):
        z = zs[t % len(zs)]
        ys, xs = np.nonzero(panc[z])
        i = int(rng.integers(len(ys)))
        r_mm = rng.uniform(4, 15)
        rho = np.hypot((yy - ys[i]) * sp[1], (xx - xs[i]) * sp[0])
        out.append({"z": z, "centre": (ys[i], xs[i]), "radius_mm": r_mm,
                    "alpha": 1 / (1 + np.exp((rho - r_mm) / 1.5)), "drop_hu": rng.uniform(20, 60)})
    return out


def ideal_hit(batch, z: int, alpha: np.ndarray, cells: tuple[int, int]) -> bool:
    """Does a perfect map of ``cells`` (h, w) on slice ``z`` (:func:`cell_cover`) peak
    inside the lesion, through the same upsampling as the CAM?"""
    from dicompipe.preprocess.inverse import to_slice
    row = next(s.row for s in batch.slices if z in s.volume_z)
    ideal = np.zeros((len(batch.tensors), *cells), np.float32)
    ideal[row] = cell_cover(batch, row, z, alpha, cells)
    iy, ix = np.unravel_index(int(np.argmax(to_slice(batch, ideal, z))), alpha.shape)
    return bool(alpha[iy, ix] > 0.5)


def ceiling_by_cells(series: Path, seg: Path, spec, cells=(10, 20, 40), trials: int = 20,
                     seed: int = 0) -> dict:
    """The lesion check's ceiling at several class-map resolutions (n x n cells) for the
    slices as ``spec`` renders them: what a finer CAM would allow, no model needed. The
    geometry is that of the lesion-free series (a lesion does not move the body crop)."""
    from dicompipe import io, preprocess
    vol = io.load(io.select(io.discover(series)))
    batch = preprocess.prepare(vol, spec, organ=None, select_slices=False)
    field_mm = batch.pad[2] * batch.grid.GetSpacing()[0]
    lesions = lesion_trials(vol, seg, trials, seed)
    out = {}
    for n in cells:
        hits = sum(ideal_hit(batch, t["z"], t["alpha"], (n, n)) for t in lesions)
        out[f"{n}x{n}"] = {"cell_mm": round(field_mm / n, 1), "ceiling": hits / trials}
    return {"trials": trials, "size_px": spec.size, "by_cells": out}


def pancreas_lesion_check(bundle, series: Path, seg: Path, trials: int = 20, seed: int = 0,
                          backend: str = "auto", figure: Path | None = None) -> dict:
    """Insert one hypo-attenuating lesion into the pancreas (:func:`lesion_trials`) and
    check where the tumour CAM of that slice peaks; ``trials`` lesions over the slices.
    ``figure``: a PNG of the first eight trials (lesion outline, tumour CAM, its peak)."""
    from dicompipe import explain, io, preprocess
    from dicompipe.model import predict
    from dicompipe.preprocess.inverse import to_volume
    vol = io.load(io.select(io.discover(series)))
    sp = vol.image.GetSpacing()
    hits, ceiling, rows, panels = 0, 0, [], []
    base = sitk.GetArrayFromImage(vol.image)
    batch0 = preprocess.prepare(vol, bundle.spec, organ=None, select_slices=False)
    probs0 = predict(bundle, batch0, backend=backend).probabilities
    k0 = bundle.labels.index("tumour")
    for les in lesion_trials(vol, seg, trials, seed):
        z, alpha, (cy, cx) = les["z"], les["alpha"], les["centre"]
        arr = base.copy()
        arr[z] -= alpha * les["drop_hu"]
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(vol.image)
        v2 = dataclasses.replace(vol, image=img)
        batch = preprocess.prepare(v2, bundle.spec, organ=None, select_slices=False)
        row = next(s.row for s in batch.slices if z in s.volume_z)
        preds = predict(bundle, batch, backend=backend)
        cams = explain.gradcam(preds)
        k = cams.labels.index("tumour")
        one = np.zeros_like(cams.maps[:, k])
        one[row] = cams.maps[row, k]
        cam = sitk.GetArrayFromImage(to_volume(batch, one))[z]
        py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
        hit = bool(alpha[py, px] > 0.5)
        hits += hit
        ceiling += ideal_hit(batch, z, alpha, one.shape[1:])
        if figure is not None and len(panels) < 8:
            panels.append((arr[z], alpha > 0.5, cam, (py, px)))
        to_lesion = ndimage.distance_transform_edt(alpha <= 0.5, sampling=(sp[1], sp[0]))[py, px]
        row0 = next(s.row for s in batch0.slices if z in s.volume_z)
        rows.append({"z": z, "radius_mm": round(les["radius_mm"], 1), "drop_hu": round(les["drop_hu"], 1),
                     "hit": hit, "p_tumour": round(float(preds.probabilities[row, k]), 3),
                     "p_tumour_without_lesion": round(float(probs0[row0, k0]), 3),
                     "distance_mm": round(float(np.hypot((py - cy) * sp[1], (px - cx) * sp[0])), 1),
                     "distance_to_lesion_mm": round(float(to_lesion), 1)})
    # the class map's cell: a bilinear map peaks on a cell centre, so a lesion smaller than a
    # cell is hit only when it happens to hold one; "within half a cell" is the map's resolution
    cell_mm = batch.pad[2] * batch.grid.GetSpacing()[0] / cams.maps.shape[-1]
    near = sum(r["distance_to_lesion_mm"] <= cell_mm / 2 for r in rows)
    p_lesion = float(np.mean([r["p_tumour"] for r in rows]))
    if figure is not None:
        lesion_figure(panels, rows, figure)
    return {"trials": trials, "cam_peak_in_lesion": hits / trials,
            "cam_peak_in_lesion_ceiling": ceiling / trials,
            "cam_cell_mm": round(cell_mm, 1), "cam_peak_within_half_a_cell_of_lesion": near / trials,
            "mean_p_tumour_with_lesion": round(p_lesion, 3),
            "mean_p_tumour_same_slices_without": round(float(np.mean([r["p_tumour_without_lesion"] for r in rows])), 3),
            "trials_detail": rows}


def cell_cover(batch, row: int, z: int, alpha: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The class map a perfect detector would give for slice ``z`` (model row ``row``): each
    cell's share of lesion (``alpha``), weighted by the cell's footprint in the slice (the
    bilinear hat that :func:`to_slice` spreads it over). Through the same upsampling, its
    peak bounds how often a map of ``shape`` (h, w) cells can peak inside the lesion."""
    from dicompipe.preprocess.inverse import to_slice
    h, w = shape
    cover = np.zeros((h, w))
    basis = np.zeros((len(batch.tensors), h, w), np.float32)
    for i in range(h):
        for j in range(w):
            basis[row, i, j] = 1.0
            hat = to_slice(batch, basis, z)
            basis[row, i, j] = 0.0
            cover[i, j] = float((hat * alpha).sum() / max(float(hat.sum()), 1e-9))
    return cover


def lesion_figure(panels, rows, path: Path) -> None:
    """Trials side by side: CT (W 400 / L 50), lesion outline (green), tumour CAM, its peak (+)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(16, 9), gridspec_kw={"hspace": 0.12, "wspace": 0.02})
    for ax, (hu, lesion, cam, (py, px)), r in zip(axes.ravel(), panels, rows):
        ax.imshow(np.clip((hu + 150) / 400, 0, 1), cmap="gray")
        if cam.max() > 0:
            ax.imshow(np.ma.masked_less(cam / cam.max(), 0.2), cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.contour(lesion, [0.5], colors="lime", linewidths=1)
        ax.plot(px, py, "w+", ms=14, mew=2)
        ax.set_title(f"z {r['z']}, r {r['radius_mm']} mm: P {r['p_tumour_without_lesion']:.2f} -> "
                     f"{r['p_tumour']:.2f}, peak {r['distance_to_lesion_mm']:.0f} mm", fontsize=9)
        ax.axis("off")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle("Synthetic pancreas lesions (green) and the tumour Grad-CAM; research use only")
    fig.savefig(path, dpi=70, bbox_inches="tight")
    plt.close(fig)


KAGGLE = {"lung": "iq-othnccd", "pancreas": "pancreas-ct-kaggle"}


def synthetic_only_scores(weights: Path, organ: str, data: Path, split_file: Path, size: int) -> dict:
    """A synthetic-only network (never trained on real labels) on the real leak-free test
    part: AUROC of P(positive) (lung: malignant vs normal; pancreas: tumour vs normal)."""
    import os

    import torch
    from safetensors.torch import load_file

    from dicompipe.model.network import resnet50
    from dicompipe.train import data as D
    from dicompipe.train.metrics import auroc
    from dicompipe.train.run import spec_v2
    from dicompipe.train.train import predict_logits
    from dicompipe.types import softmax
    root = data / KAGGLE[organ]
    spec = spec_v2(organ, size)
    items, labels = D.scan(root, organ)
    parts = json.loads(split_file.read_text())["parts"]
    te = np.array([parts.get(os.path.relpath(it.path, root)) == "test" for it in items])
    y = np.array([it.label for it in items])[te]
    pos = labels.index(D.positive_of(organ)[0])
    keep = (y == 0) | (y == pos)
    images = D.build_cache([it for it, t in zip(items, te) if t], spec,
                           ROOT / "training" / f"cache_v2_{organ}_{size}_test.npz", log=None)
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:          # lesion training records the dilation
        dilation = int((f.metadata() or {}).get("layer4_dilation", 1))
    net = resnet50(len(labels), layer4_dilation=dilation)
    net.load_state_dict(load_file(str(weights)))
    torch.set_num_threads(2)
    p = softmax(predict_logits(net, images, spec), np.float64)[:, pos]
    return {"weights": weights.name, "n_test": int(keep.sum()),
            f"auroc_{labels[pos]}_vs_normal": round(float(auroc((y[keep] == pos).astype(int), p[keep])), 4)}


def pixel_features(g: np.ndarray) -> np.ndarray:
    """Grey-level statistics of one rendered slice (values in [0, 1]) inside its non-zero
    region: mean, spread, percentiles, share of black pixels, texture (mean |Laplacian|)."""
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(g > 0.02, iterations=3))
    v = g[inside] if inside.any() else g.ravel()
    lap = np.abs(ndimage.laplace(g))[inside].mean() if inside.any() else 0.0
    return np.array([v.mean(), v.std(), *np.percentile(v, [10, 25, 50, 75, 90]),
                     (v < 0.02).mean(), lap, inside.mean()])


def cv_logistic_auroc(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """AUROC of a 5-fold cross-validated logistic regression (numpy, standardised features,
    class-weighted, L2): can these features tell the two kinds apart?"""
    from dicompipe.train.metrics import auroc
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    score = np.zeros(len(y))
    for f in range(folds):
        te = order[f::folds]
        tr = np.setdiff1d(order, te)
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-9
        a, b = (x[tr] - mu) / sd, (x[te] - mu) / sd
        w, c = np.zeros(x.shape[1]), 0.0
        cw = np.where(y[tr] == 1, 0.5 / y[tr].mean(), 0.5 / (1 - y[tr].mean()))
        for _ in range(500):
            p = 1 / (1 + np.exp(-(a @ w + c)))
            g = cw * (p - y[tr])
            w -= 0.1 * (a.T @ g / len(tr) + 1e-2 * w)
            c -= 0.1 * g.mean()
        score[te] = b @ w + c
    return float(auroc(y, score))


def domain_probe(organ: str, bundle, data: Path, n_images: int = 300) -> dict:
    """8-bit training slices vs the shared DICOM series, both rendered by ``bundle``'s spec:
    AUROC of a probe on grey-level statistics alone (0.5 = indistinguishable)."""
    from dicompipe import io, preprocess
    from dicompipe.train import data as D
    spec = bundle.spec
    items, _ = D.scan(data / KAGGLE[organ], organ)
    pick = np.random.default_rng(0).choice(len(items), min(n_images, len(items)), replace=False)
    feats, kind = [], []
    for i in pick:
        a, windowed, _ = D.read_gray(items[i].path)
        from dicompipe.preprocess.render import render
        feats.append(pixel_features(render(a, spec, windowed)[0] * spec.std + spec.mean))
        kind.append(0)
    n_dicom = 0
    for _name, (rel, own) in SERIES.items():
        if own != organ or not (data / rel).exists():
            continue
        vol = io.load(io.select(io.discover(data / rel)))
        batch = preprocess.prepare(vol, spec, organ=organ)
        for t in batch.tensors:
            feats.append(pixel_features(t[0] * spec.std + spec.mean))
            kind.append(1)
            n_dicom += 1
    x, y = np.array(feats), np.array(kind)
    return {"n_8bit": int((y == 0).sum()), "n_dicom": n_dicom,
            "probe_auroc_8bit_vs_dicom": round(cv_logistic_auroc(x, y), 3),
            "features": "mean, sd, p10/25/50/75/90, black share, mean |Laplacian|, body share"}


def run(lung=None, pancreas=None, data: Path = DATA, lesion_trials: int = 20,
        organs=("lung", "pancreas"), backend: str = "auto", figure: Path | None = None,
        mass_trials: int = 16, mass_radius=(12.0, 25.0)) -> dict:
    from dicompipe import model as model_stage
    out: dict = {}
    given = {"lung": lung, "pancreas": pancreas}
    bundles = {o: model_stage.load_bundle(given[o] or f"{o}-resnet50", organ=o, allow_untrained=True)
               for o in organs}
    for organ, b in bundles.items():
        out[organ] = {"bundle": f"{b.name} {b.version}", "bundle_path": str(b.path),
                      "sha256": b.sha256, "backend": backend, "series": {}}
    for name, (rel, _own_organ) in SERIES.items():
        path = data / rel
        if not path.exists():
            continue
        for organ, b in bundles.items():
            try:
                a = analyse(path, organ, b, backend)
            except Exception as e:                               # noqa: BLE001 - reported
                out[organ]["series"][name] = {"error": str(e)}
                continue
            rec = {"verdict": verdict_summary(a), "cam_in_body": body_shares(a)}
            if organ == "lung" and name == "lung-pet-ct-dx-a0001":
                rec["tumour"] = lung_tumour_check(a, data / "lung-pet-ct-dx-a0001" / "tumour_boxes.json")
            if organ == "lung" and name == "lidc-idri-0001":
                rec["nodule"] = lidc_check(a, data / "lidc-idri-0001" / "annotations.xml")
            out[organ]["series"][name] = rec
    for organ, b in bundles.items():
        if (data / KAGGLE[organ]).exists():
            out[organ]["domain_probe"] = domain_probe(organ, b, data)
    a0001 = data / "lung-pet-ct-dx-a0001"
    if a0001.exists() and mass_trials and "lung" in bundles:
        out["lung"]["synthetic_mass_ranking"] = lung_mass_ranking_check(
            bundles["lung"], a0001 / "series", a0001 / "tumour_boxes.json", mass_trials,
            radius_mm=mass_radius, backend=backend)
    seg = data / "abdomen-ct-dicom" / "reference_segmentation.nii.gz"
    if seg.exists() and lesion_trials and "pancreas" in bundles:
        out["pancreas"]["synthetic_lesion_check"] = pancreas_lesion_check(
            bundles["pancreas"], data / "abdomen-ct-dicom" / "series", seg, lesion_trials,
            backend=backend, figure=figure)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lung", help="lung bundle folder (default: built-in)")
    ap.add_argument("--pancreas", help="pancreas bundle folder (default: built-in)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--lesion-trials", type=int, default=20)
    ap.add_argument("--mass-trials", type=int, default=16,
                    help="synthetic masses drawn into a0001's lung to compare slice rankings (0: skip)")
    ap.add_argument("--mass-radius", default="12,25", help="their radius range in mm (default 12,25)")
    ap.add_argument("--organs", default="lung,pancreas", help="which bundles to measure")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--backend", default="auto", help="inference backend, e.g. openvino-int8 (default auto)")
    ap.add_argument("--lesion-figure", type=Path, help="PNG of the first eight pancreas lesion trials")
    ap.add_argument("--ceiling-cells", help="e.g. 10,20,40: the pancreas lesion check's ceiling for "
                                            "class maps of n x n cells, slices rendered as the 2.x "
                                            "recipe renders them at 160 px (no model run)")
    ap.add_argument("--synthetic-only", nargs=4, action="append", default=[],
                    metavar=("ORGAN", "WEIGHTS", "SPLIT_JSON", "SIZE"),
                    help="also score a synthetic-only network's safetensors on the real test part")
    args = ap.parse_args(argv)
    res = run(args.lung, args.pancreas, args.data, args.lesion_trials, tuple(args.organs.split(",")), args.backend,
              args.lesion_figure, args.mass_trials, tuple(float(r) for r in args.mass_radius.split(",")))
    seg = args.data / "abdomen-ct-dicom" / "reference_segmentation.nii.gz"
    if args.ceiling_cells and seg.exists():
        from dicompipe.train.run import spec_v2
        spec = spec_v2("pancreas", 160)
        res.setdefault("pancreas", {})["lesion_check_ceiling_by_cells"] = ceiling_by_cells(
            args.data / "abdomen-ct-dicom" / "series", seg, spec,
            tuple(int(n) for n in args.ceiling_cells.split(",")), args.lesion_trials)
        print(json.dumps(res["pancreas"]["lesion_check_ceiling_by_cells"]))
    for organ, w, split, size in args.synthetic_only:
        res.setdefault(organ, {})["synthetic_only"] = synthetic_only_scores(
            Path(w), organ, args.data, Path(split), int(size))
    for organ in res:
        md = json.loads((Path(res[organ].get("bundle_path", "")) / "configs" / "metadata.json").read_text()) \
            if res.get(organ, {}).get("bundle_path") else None
        if md:
            t = md.get("metrics", {}).get("leak_free_test", {})
            res[organ]["leak_free_test"] = {k: t.get(k) for k in (
                "n", "macro_auroc", "macro_auroc_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
                f"sensitivity_{'malignant' if organ == 'lung' else 'tumour'}", "ece") if k in t}
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
