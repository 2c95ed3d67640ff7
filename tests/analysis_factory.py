"""Hand-built :class:`dicompipe.types.Analysis` objects for report, history and UI tests.

No model, no io stage: a small SimpleITK volume, a SliceBatch, SlicePredictions with
made-up but consistent numbers, a Verdict aggregated from them (top-k mean of calibrated
slice probabilities) and a CamStack whose maps peak on a synthetic "nodule". With
``dicom_dir`` the volume is also written as a real CT series (tests/synth.py) so that
DICOM SR / Secondary Capture writers have source instances to reference.

Example::

    >>> from analysis_factory import make_analysis
    >>> a = make_analysis()                                   # lung, 3 classes, 8 slices
    >>> a = make_analysis(tmp_path / "src", organ="pancreas")  # with DICOM source files
    >>> a.verdict.label, a.verdict.probabilities
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicompipe.types import (
    Analysis,
    CamStack,
    InstanceRef,
    KeySlice,
    ModelSlice,
    PreprocessSpec,
    SeriesInfo,
    SliceBatch,
    SlicePredictions,
    Verdict,
    Volume,
)

LABELS = {"lung": ["normal", "benign", "malignant"], "pancreas": ["normal", "tumour"]}
NODULE = (0.55, 0.4)          # (row, column) of the synthetic lesion, fraction of the slice


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _phantom(nz: int, ny: int, nx: int, lesion_z: list[int]) -> np.ndarray:
    """A chest-like HU phantom: soft-tissue body, two lungs, a 60 HU nodule on lesion_z."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    body = ((yy - cy) / (0.45 * ny)) ** 2 + ((xx - cx) / (0.47 * nx)) ** 2 < 1
    lung_r = ((yy - cy) / (0.33 * ny)) ** 2 + ((xx - 0.30 * nx) / (0.16 * nx)) ** 2 < 1
    lung_l = ((yy - cy) / (0.33 * ny)) ** 2 + ((xx - 0.70 * nx) / (0.16 * nx)) ** 2 < 1
    nod = ((yy - NODULE[0] * ny) ** 2 + (xx - NODULE[1] * nx) ** 2) < (0.06 * nx) ** 2
    vol = np.full((nz, ny, nx), -1000.0, np.float32)
    for z in range(nz):
        s = vol[z]
        s[body] = 40.0
        s[lung_r | lung_l] = -850.0
        if z in lesion_z:
            s[nod] = 60.0
    return vol


def make_analysis(dicom_dir: str | Path | None = None, *, organ: str = "lung",
                  n_z: int = 8, size: int = 64, skip: tuple[int, ...] = (0,),
                  lesion_z: tuple[int, ...] = (3, 4, 5), with_cams: bool = True,
                  cam_volumes: bool = True, empty_uids: bool = False,
                  include_phi: bool = False, windowed: bool = False, k: int = 3,
                  uncertain_band: tuple[float, float] = (0.4, 0.6),
                  temperature: float = 1.5) -> Analysis:
    """A consistent Analysis for ``organ`` ("lung": 3 classes, "pancreas": 2).

    ``skip``: z indices marked skipped by slice selection. ``lesion_z``: slices whose
    logits favour the last class (malignant / tumour) and whose CAM is hot on the lesion.
    ``dicom_dir``: also write the volume as a CT series there (``empty_uids`` blanks the
    UIDs in the data sets as the abdomen example does). ``cam_volumes=False`` leaves
    ``CamStack.volumes`` empty (writers must fall back to the per-slice maps).
    ``windowed=True`` makes a PNG-slice style input (0..255, kind "images").
    """
    labels = LABELS[organ]
    K = len(labels)
    spacing = (0.8, 0.8, 2.5)                      # x, y, z mm
    origin = (-size * 0.4, -size * 0.4, -120.0)
    hu = _phantom(n_z, size, size, list(lesion_z))
    if windowed:
        hu = np.clip((hu + 1350) / 1500 * 255, 0, 255).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)

    # ---- source instances (real DICOM files when dicom_dir is given)
    study_uid = series_uid = for_uid = None
    if dicom_dir is not None and not windowed:
        import pydicom
        from synth import write_ct_series  # tests/synth.py
        files = write_ct_series(dicom_dir, shape=(n_z, size, size), spacing=spacing,
                                origin=origin, hu=hu, empty_uids=empty_uids,
                                description=f"Synthetic {organ} CT",
                                body_part="CHEST" if organ == "lung" else "ABDOMEN")
        refs = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            refs.append(InstanceRef(file=str(f), sop_instance_uid=ds.SOPInstanceUID or None,
                                    instance_number=int(ds.InstanceNumber),
                                    position=tuple(float(v) for v in ds.ImagePositionPatient)))
            study_uid = ds.StudyInstanceUID or None
            series_uid = ds.SeriesInstanceUID or None
            for_uid = ds.FrameOfReferenceUID
        kind, source = "dicom", str(dicom_dir)
    else:
        suffix = ".png" if windowed else ".dcm"
        refs = [InstanceRef(file=f"/data/case/slice_{z:03d}{suffix}",
                            sop_instance_uid=None if windowed else f"2.25.{1000 + z}",
                            instance_number=z + 1,
                            position=(origin[0], origin[1], origin[2] + z * spacing[2]))
                for z in range(n_z)]
        kind, source = ("images" if windowed else "dicom"), "/data/case"
        if not windowed:
            study_uid, series_uid, for_uid = "2.25.1", "2.25.2", "2.25.3"

    series = SeriesInfo(
        key="s1", kind=kind, source=source, instances=refs, study_instance_uid=study_uid,
        series_instance_uid=series_uid, frame_of_reference_uid=for_uid,
        sop_class_uid=None if windowed else "1.2.840.10008.5.1.4.1.1.2", modality="CT",
        series_number=1, series_description=f"Synthetic {organ} CT",
        body_part="CHEST" if organ == "lung" else "ABDOMEN", rows=size, columns=size,
        pixel_spacing=(spacing[1], spacing[0]), slice_thickness=spacing[2],
        orientation="axial", spacing_stats={"min": 2.5, "median": 2.5, "max": 2.5,
                                            "largest_gap": 2.5},
        reason="the only usable CT series", patient_id="SYNTH001",
        patient_name="Synthetic^Phantom", study_date="20260101")
    volume = Volume(image=image, slices=[[r] for r in refs], series=series, windowed=windowed,
                    warnings=["volume: synthetic test data"])

    # ---- batch: no resampling, the grid is the volume
    spec = PreprocessSpec(windows=[(-600.0, 1500.0)])
    slices, row = [], 0
    for z in range(n_z):
        inc = z not in skip
        slices.append(ModelSlice(z=z, volume_z=[z], sources=[refs[z]], included=inc,
                                 skip_reason=None if inc else "no lung in slice (synthetic)",
                                 row=row if inc else None))
        row += inc
    n = row
    batch = SliceBatch(tensors=np.zeros((n, 3, 8, 8), np.float32), slices=slices, spec=spec,
                       grid=image, pad=(0, 0, size), volume=volume,
                       warnings=["preprocess: synthetic"])

    # ---- predictions: the last class wins on lesion slices, the first elsewhere
    inc_z = [s.z for s in slices if s.included]
    logits = np.zeros((n, K), np.float32)
    for r, z in enumerate(inc_z):
        strong = z in lesion_z
        logits[r, 0] = 0.2 if strong else 2.0
        logits[r, -1] = 3.5 + 0.3 * (z == lesion_z[len(lesion_z) // 2]) if strong else -0.5
        if K == 3:
            logits[r, 1] = 0.8 if strong else 0.2
    probs = _softmax(logits)
    feats = np.zeros((n, 4, 7, 7), np.float32)
    preds = SlicePredictions(labels=labels, logits=logits, probabilities=probs, features=feats,
                             head_weight=np.zeros((K, 4), np.float32),
                             head_bias=np.zeros(K, np.float32), batch=batch,
                             model_info={"backend": "test"}, seconds=0.01)

    # ---- verdict: the class with the highest top-k mean of calibrated slice probabilities;
    # its probabilities are the mean over those k slices (so they sum to 1)
    cal = _softmax(logits / temperature)
    kk = min(k, n)
    topk = {i: np.argsort(-cal[:, i], kind="stable")[:kk] for i in range(K)}
    li = max(range(K), key=lambda i: cal[topk[i], i].mean())
    label = labels[li]
    top_rows = [int(r) for r in topk[li]]
    vprobs = {l: float(cal[top_rows, i].mean()) for i, l in enumerate(labels)}
    keys = []
    for r in top_rows:
        s = next(s for s in slices if s.row == r)
        keys.append(KeySlice(row=int(r), z=s.z, volume_z=s.volume_z,
                             instance_numbers=[i.instance_number for i in s.sources],
                             sop_instance_uids=[i.sop_instance_uid for i in s.sources],
                             files=[i.file for i in s.sources], probability=float(cal[r, li])))
    top = vprobs[label]
    verdict = Verdict(label=label, probabilities=vprobs,
                      uncertain=top <= uncertain_band[1],
                      uncertain_band=uncertain_band, rule=f"topk_mean(k={kk})",
                      temperature=temperature, key_slices=keys, n_slices=n,
                      evidence_label=label, model_label=label)

    # ---- CAMs: a Gaussian on the lesion, strength ~ class logit
    cams = None
    if with_cams:
        yy, xx = np.mgrid[0:7, 0:7]
        blob = np.exp(-(((yy - NODULE[0] * 6) ** 2 + (xx - NODULE[1] * 6) ** 2) / 2.0))
        maps = np.zeros((n, K, 7, 7), np.float32)
        for r in range(n):
            for c in range(K):
                maps[r, c] = np.maximum(logits[r, c], 0) * blob + 0.05 * (c + 1)
        scale = {l: float(maps[:, i].max()) for i, l in enumerate(labels)}
        vols = {}
        if cam_volumes:
            from skimage.transform import resize
            for i, l in enumerate(labels):
                arr = np.zeros((n_z, size, size), np.float32)
                for r, z in enumerate(inc_z):
                    arr[z] = resize(maps[r, i], (size, size), order=1, mode="edge")
                v = sitk.GetImageFromArray(arr)
                v.CopyInformation(image)
                vols[l] = v
        cams = CamStack(labels=labels, maps=maps, scale=scale, volumes=vols,
                        faithfulness={"deletion_auc": 0.21, "insertion_auc": 0.74})

    model = {"name": f"{organ}-resnet50-test", "version": "0.0.1", "sha256": "ab" * 32,
             "task": "classification", "labels": labels,
             "intended_use": "tests only", "organ": organ}
    return Analysis(
        input=source, organ=organ, organ_reason="given by the user", series=series,
        candidates=[series], volume=volume, batch=batch, predictions=preds, verdict=verdict,
        cams=cams, model=model,
        timings={"discover": 0.01, "load": 0.02, "predict": 0.5, "explain": 0.05},
        warnings=["volume: synthetic test data", "preprocess: synthetic"],
        created="2026-11-30T09:00:00+00:00", include_phi=include_phi)
