"""The small dataclasses that cross stage boundaries (see docs/architecture.md, "Data flow").

Every stage takes and returns these; no stage reaches into another stage's internals.
Geometry convention: LPS (DICOM patient coordinates), arrays indexed (z, y, x), and the
`SimpleITK.Image` carries origin/spacing/direction.

Example::

    >>> import dicompipe
    >>> series = dicompipe.io.discover("study/")          # list[SeriesInfo]
    >>> vol = dicompipe.io.load(dicompipe.io.select(series))
    >>> vol.array.shape                                     # (z, y, x), HU
"""
from __future__ import annotations

import dataclasses
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESEARCH_USE = "RESEARCH USE ONLY - not for clinical diagnosis or treatment decisions."


def softmax(logits, dtype=np.float32) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64 inside, ``dtype`` out): the
    one definition of :attr:`SlicePredictions.probabilities` (training metrics ask for
    float64).

    >>> softmax(np.array([[0.0, 0.0]]))
    array([[0.5, 0.5]], dtype=float32)
    """
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype)


# --------------------------------------------------------------------------- input
@dataclass
class InstanceRef:
    """One source image (a DICOM instance or frame, or an image file) behind a z index.

    ``frame`` is the 0-based frame number in a multi-frame file (None for single-frame).
    ``position`` is ImagePositionPatient (LPS, mm) when known.
    """

    file: str
    sop_instance_uid: str | None = None
    instance_number: int | None = None
    frame: int | None = None
    position: tuple[float, float, float] | None = None
    # the io stage may keep per-instance header facts it needs for loading here
    # (orientation, rescale slope/intercept, rows/columns...); other stages must not rely on them
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class SeriesInfo:
    """One candidate volume found by ``io.discover`` (a series, or part of one).

    ``kind`` is "dicom", "images" (PNG/JPG slices, already windowed 8-bit) or "nifti".
    ``usable`` is False with ``unusable_reason`` set for scouts, SR, SC, RT, single slices...
    ``reason`` is filled by ``io.select`` (why this one was chosen).
    """

    key: str                                   # unique within one discover() result
    kind: str                                  # "dicom" | "images" | "nifti"
    source: str                                # the path the user gave
    instances: list[InstanceRef] = field(default_factory=list, repr=False)
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    image_type: tuple[str, ...] = ()
    body_part: str | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: tuple[float, float] | None = None     # (row, column) mm
    slice_thickness: float | None = None
    orientation: str | None = None                       # axial | coronal | sagittal | oblique
    gantry_tilt: float | None = None                      # degrees
    spacing_stats: dict[str, float] = field(default_factory=dict)  # min/median/max/largest_gap mm
    transfer_syntax: str | None = None
    usable: bool = True
    unusable_reason: str | None = None
    reason: str | None = None
    # PHI: only shown/written when the user asks for it (--include-phi)
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    def to_dict(self, include_phi: bool = False) -> dict:
        d = _plain(self, skip={"instances", "patient_id", "patient_name", "study_date"})
        d["n_instances"] = self.n_instances
        if include_phi:
            d.update(patient_id=self.patient_id, patient_name=self.patient_name,
                     study_date=self.study_date)
        return d


@dataclass
class Volume:
    """A CT volume in HU (or 8-bit display values when ``windowed``), LPS geometry.

    ``image`` is the authority for geometry; ``array`` is a (z, y, x) view of its voxels.
    ``slices[z]`` names the source instance(s) behind z index ``z`` (several when the
    loader interpolated, empty for a slice synthesised to fill a gap).
    """

    image: Any                                  # SimpleITK.Image, float32 HU (or 0..255)
    slices: list[list[InstanceRef]]
    series: SeriesInfo
    windowed: bool = False                      # True for PNG/JPG input: do not window again
    warnings: list[str] = field(default_factory=list)

    @property
    def array(self) -> np.ndarray:
        # a read-only view that keeps the image alive: SimpleITK's own view does not, so
        # ``io.load(s).array`` would otherwise point at freed memory once the Volume is gone
        return np.asarray(_ImageBuffer(self.image))

    @property
    def shape(self) -> tuple[int, int, int]:
        x, y, z = self.image.GetSize()
        return (z, y, x)


class _ImageBuffer:
    """Exposes a SimpleITK image's voxels to numpy (z, y, x) while holding the image."""

    def __init__(self, image):
        import SimpleITK as sitk
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


# --------------------------------------------------------------------------- preprocess
#: the ``PreprocessSpec.input_region`` values this dicompipe renders
INPUT_REGIONS = ("lung_fields",)


@dataclass
class PreprocessSpec:
    """How a bundle wants its input rendered; stored in the bundle's metadata.json.

    ``windows``: (level, width) HU pairs, one per channel when ``channel_mode`` is
    "windows"; with "neighbours" the first window is used and channels are slices z-1, z, z+1.
    ``spacing``: in-plane mm to resample to (None keeps the source spacing).
    ``slab_mm``: z thickness of a model slice (None keeps source slices).
    Intensities are scaled to [0, 1] after windowing, then ``(x - mean) / std``.

    Input hygiene (bundles 2.x; the defaults keep 1.x bundles rendering as before):
    ``transfer``: HU -> 8-bit representation for the model (``preprocess.body.to_u8``:
    {"kind": "floor", ...} or {"kind": "window", "window": [level, width]}); None uses
    ``windows``. ``body_mask``: everything outside the patient (table, blankets, air) set to
    background and the image cropped to the body (``crop_margin`` x its size around it)
    before square padding; ``mask_threshold`` is the 8-bit foreground level (``mask_adaptive``: raised to
    Otsu's level above it, for exports that show air as grey).
    ``equalize``: rank-equalise intensities inside the body, which makes the input the same
    under any monotone display transfer (an 8-bit export's window, or HU).
    ``input_region``: "lung_fields" sets everything outside the slice's lung fields, widened
    by ``region_margin`` x the image side, to background (``preprocess.region.lung_only``,
    found on the rendered slice at 256 px, so the same for HU and 8-bit input); None keeps
    the whole body.
    """

    windows: list[tuple[float, float]] = field(default_factory=lambda: [(-600.0, 1500.0)])
    channel_mode: str = "windows"               # "windows" | "neighbours"
    channels: int = 3
    size: int = 224
    spacing: float | None = None
    slab_mm: float | None = None
    mean: float = 0.5
    std: float = 0.25
    transfer: dict | None = None
    body_mask: bool = False
    mask_threshold: float = 40.0
    mask_adaptive: bool = False
    crop_margin: float = 0.04
    equalize: bool = False
    input_region: str | None = None
    region_margin: float = 0.05

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        d = dict(d)
        if "windows" in d:
            d["windows"] = [tuple(map(float, w)) for w in d["windows"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return _plain(self)


@dataclass
class ModelSlice:
    """One model input slice and where it came from.

    ``z`` is its index on the resampled grid (``SliceBatch.grid``); ``volume_z`` the
    volume z indices it covers; ``sources`` the source instances; ``included`` False with
    ``skip_reason`` when slice selection skipped it; ``row`` its row in
    ``SliceBatch.tensors`` (None when skipped).
    """

    z: int
    volume_z: list[int]
    sources: list[InstanceRef]
    included: bool = True
    skip_reason: str | None = None
    row: int | None = None


@dataclass
class SliceBatch:
    """Model-ready tensors for the included slices, plus the map back to the volume.

    ``tensors``: float32 (n_included, C, size, size). ``grid``: a SimpleITK image with the
    geometry of the resampled volume the slices were cut from (z = model slices).
    ``pad``: (y0, x0, side) — each grid slice was placed at (y0, x0) in a side×side square,
    then resized to size×size. ``preprocess.to_volume(batch, maps)`` inverts all of it.
    """

    tensors: np.ndarray
    slices: list[ModelSlice]
    spec: PreprocessSpec
    grid: Any                                   # SimpleITK.Image (geometry reference)
    pad: tuple[int, int, int]
    volume: Volume
    warnings: list[str] = field(default_factory=list)
    # set by prepare(..., render_ahead=True): ``pending(n)`` blocks until rows [0, n) of
    # ``tensors`` are rendered (re-raising a rendering error); None when all are there
    pending: Any = field(default=None, repr=False, compare=False)

    @property
    def included(self) -> list[ModelSlice]:
        return [s for s in self.slices if s.included]

    def wait_rows(self, n: int | None = None) -> None:
        """Block until the first ``n`` rows of ``tensors`` (default: all) are rendered."""
        if self.pending is not None:
            self.pending(len(self.tensors) if n is None else min(n, len(self.tensors)))


# --------------------------------------------------------------------------- model
@dataclass
class SlicePredictions:
    """Per-slice outputs of ``model.predict`` for the included slices (row order of tensors).

    ``features``: layer4 activations (n, 2048, h, w) float32 — kept so Grad-CAM costs no
    second pass. ``head_weight``/``head_bias``: the linear head (K, 2048)/(K,).
    ``probabilities`` are the uncalibrated :func:`softmax` of ``logits``.
    """

    labels: list[str]
    logits: np.ndarray
    probabilities: np.ndarray
    features: np.ndarray | None
    head_weight: np.ndarray
    head_bias: np.ndarray
    batch: SliceBatch
    model_info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class OodCheck:
    """Out-of-distribution check of one volume's slices (``model.ood.check``).

    ``available`` is False when the bundle has no OOD model (``note`` says so); then no
    slice is left out and the volume is never called out of distribution. ``scores`` and
    ``out_rows`` are by row of :class:`SlicePredictions`; a slice is out when its score is
    above ``slice_threshold``; the volume is out by ``volume_rule``.

    >>> OodCheck(available=False, note="not available: the bundle has no OOD model")
    """

    available: bool
    method: str | None = None
    scores: list[float] = field(default_factory=list)
    slice_threshold: float | None = None
    out_rows: list[int] = field(default_factory=list)
    volume_rule: str | None = None
    out_of_distribution: bool = False
    note: str | None = None


@dataclass
class Confidence:
    """How far a verdict can be trusted (``model.confidence.assess``).

    ``status``: "confident", "uncertain", "outside training data" or "model not validated
    on this kind of input"; ``reasons``: every reason that applies, worst first;
    ``performance``: the bundle's measured test performance shown beside the verdict;
    ``bar``: the documented bar the bundle had to meet.
    """

    status: str
    reasons: list[str] = field(default_factory=list)
    performance: dict[str, Any] | None = None
    bar: str = ""


@dataclass
class KeySlice:
    """A slice that decided the verdict (see ``Verdict.evidence_label``)."""

    row: int                    # row in SlicePredictions
    z: int                      # grid z
    volume_z: list[int]
    instance_numbers: list[int | None]
    sop_instance_uids: list[str | None]
    files: list[str]
    probability: float          # calibrated probability of the evidence label on this slice
    in_region: float | None = None   # share of its Grad-CAM inside the organ region (Verdict.region)


NOT_ASSESSABLE = "not assessable"


@dataclass
class Verdict:
    """Volume-level result of ``model.aggregate``.

    ``label`` is a class, or ``NOT_ASSESSABLE`` ("not assessable") when the input is unlike
    the model's training data (``reason`` says so; ``probabilities`` are then the model's
    output shown for transparency only). ``model_label`` is the class with the highest
    aggregated probability either way. ``evidence_label`` is the class whose slice
    evidence decided the verdict under the rule; ``key_slices`` show that evidence.
    ``uncertain``: the top probability is at or below the band's upper end.
    ``region``: the organ region (e.g. the lung fields) whose Grad-CAM mass on each slice
    (``region_evidence``) ranked the slices, with the share of each map inside it
    (``region_share``); None when the slices were ranked by probability.
    """

    label: str
    probabilities: dict[str, float]             # calibrated, sums to 1
    uncertain: bool
    uncertain_band: tuple[float, float]         # top probability <= band[1] => uncertain
    rule: str                                   # "topk_mean(k=5)" | "max" | "mean" | "noisy_or"
    temperature: float
    key_slices: list[KeySlice] = field(default_factory=list)
    n_slices: int = 0
    evidence_label: str | None = None
    model_label: str | None = None
    assessable: bool = True
    reason: str | None = None
    ood: OodCheck | None = None
    confidence: Confidence | None = None
    region: str | None = None                   # organ region that ranked the slices, if any
    region_evidence: dict[str, list[float]] | None = None   # per abnormal class, per analysed slice
    region_share: dict[str, list[float]] | None = None

    @property
    def class_label(self) -> str:
        """The class the aggregated probabilities favour (``label`` unless not assessable)."""
        return self.label if self.assessable else (self.model_label or self.label)

    @property
    def evidence(self) -> str:
        """The class whose evidence the key slices (and their Grad-CAM) show."""
        return self.evidence_label or self.class_label

    @property
    def region_name(self) -> str | None:
        """The organ region without its details: "lung fields" (None when none ranked)."""
        return self.region.split(" (")[0] if self.region else None

    @property
    def ranked_by(self) -> str:
        """What ranked the key slices, in words: "its Grad-CAM in the lung fields" or
        "P(malignant)"."""
        return f"its Grad-CAM in the {self.region_name}" if self.region else f"P({self.evidence})"

    def to_dict(self) -> dict:
        return _plain(self)


# --------------------------------------------------------------------------- explain
@dataclass
class CamStack:
    """Grad-CAM maps for every analysed slice and class.

    ``maps``: raw (n_included, K, h, w) float32 at layer4 resolution, ReLU applied, not
    normalised. ``scale[label]``: one display maximum per class for the whole volume.
    ``volumes[label]``: a SimpleITK image on the source volume's exact grid (raw values);
    ``explain.gradcam`` makes it a mapping that computes a class's volume on first access.
    """

    labels: list[str]
    maps: np.ndarray
    scale: dict[str, float]
    method: str = "gradcam"
    volumes: dict[str, Any] = field(default_factory=dict)
    faithfulness: dict[str, float] | None = None

    def display(self, row: int, label: str, per_slice: bool = False) -> np.ndarray:
        """Map of one slice scaled to [0, 1] with the volume-wide scale (or per slice)."""
        m = self.maps[row, self.labels.index(label)]
        top = float(m.max()) if per_slice else self.scale[label]
        return np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)


# --------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    """Everything a report needs; ``to_dict()`` is analysis.json."""

    input: str
    organ: str
    organ_reason: str
    series: SeriesInfo
    candidates: list[SeriesInfo]
    volume: Volume
    batch: SliceBatch
    predictions: SlicePredictions
    verdict: Verdict
    cams: CamStack | None
    model: dict[str, Any]                       # model card summary: name, version, sha256...
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    created: str = ""
    include_phi: bool = False

    # 1.1: "inference" (backend, device, threads); 1.2: verdict evidence_label, model_label,
    # assessable, reason, ood, confidence; slices ood_score and excluded_reason
    SCHEMA_VERSION = "1.2"

    def slice_table(self) -> list[dict]:
        """One row per model slice: index, sources, probabilities, included/skipped and why,
        and (when the bundle has an OOD model) the slice's OOD score and whether it was left
        out of the aggregate (``excluded_reason``)."""
        labels = self.predictions.labels
        temp = self.verdict.temperature or 1.0
        cal = softmax(self.predictions.logits / temp) if len(self.predictions.logits) else None
        ood = self.verdict.ood if self.verdict.ood is not None and self.verdict.ood.available else None
        out_rows = set(ood.out_rows) if ood else set()
        rows = []
        for s in self.batch.slices:
            r = {
                "z": s.z, "volume_z": s.volume_z, "included": s.included,
                "skip_reason": s.skip_reason,
                "instance_numbers": [i.instance_number for i in s.sources],
                "sop_instance_uids": [i.sop_instance_uid for i in s.sources],
                "files": [i.file for i in s.sources],
            }
            row = s.row
            if s.included and cal is not None and row is not None:
                r["probabilities"] = {l: float(p) for l, p in zip(labels, cal[row])}
                if ood and row < len(ood.scores):
                    r["ood_score"] = float(ood.scores[row])
                    r["excluded_reason"] = "out of distribution" if row in out_rows else None
            rows.append(r)
        return rows

    def to_dict(self) -> dict:
        """analysis.json. Without ``include_phi``, paths, file names and free text are
        pseudonymised (see :mod:`dicompipe.phi`)."""
        d = {
            "schema_version": self.SCHEMA_VERSION,
            "disclaimer": RESEARCH_USE,
            "created": self.created,
            "input": self.input,
            "organ": self.organ,
            "organ_reason": self.organ_reason,
            "series": self.series.to_dict(self.include_phi),
            "candidates": [c.to_dict(self.include_phi) for c in self.candidates],
            "volume": {
                "shape_zyx": list(self.volume.shape),
                "spacing_xyz": list(self.volume.image.GetSpacing()),
                "origin_xyz": list(self.volume.image.GetOrigin()),
                "direction": list(self.volume.image.GetDirection()),
                "windowed_input": self.volume.windowed,
            },
            "preprocess": self.batch.spec.to_dict(),
            "verdict": self.verdict.to_dict(),
            "slices": self.slice_table(),
            "cams": None if self.cams is None else {
                "method": self.cams.method, "labels": self.cams.labels,
                "scale": self.cams.scale, "faithfulness": self.cams.faithfulness},
            "model": self.model,
            "inference": {k: v for k, v in self.predictions.model_info.items()
                          if k in ("backend", "device", "threads", "batch_size")},
            "timings": self.timings,
            "warnings": self.warnings,
        }
        return d if self.include_phi else redact_dict(self, d)


@dataclass
class CaseResult:
    """What :func:`dicompipe.pipeline.run_case` did with one case: the analysis, the report
    folder (None when it could not be written) and the history record id (None when not
    recorded), with the error of each step that failed. ``errors`` lists them in order.
    """

    analysis: Analysis
    run_dir: Path | None = None
    record_id: int | None = None
    report_error: BaseException | None = None
    history_error: BaseException | None = None

    @property
    def errors(self) -> list[BaseException]:
        return [e for e in (self.report_error, self.history_error) if e is not None]

    @property
    def ok(self) -> bool:
        return not self.errors


def redact_dict(analysis: Analysis, d: dict) -> dict:
    """``d`` (from ``analysis.to_dict()``) without patient identifiers: descriptions
    withheld, the input path and source files pseudonymised (:mod:`dicompipe.phi`)."""
    from dicompipe.phi import INPUT, Redactor
    for s in [d.get("series")] + list(d.get("candidates") or []):
        if isinstance(s, dict) and s.get("series_description"):
            s["series_description"] = None
    d["input"] = INPUT
    return Redactor.for_analysis(analysis).walk(d)


def _plain(obj, skip: AbstractSet[str] = frozenset()) -> dict:
    """Dataclass -> JSON-ready dict (numpy scalars/arrays and tuples made plain)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.name in skip or f.name == "meta":
            continue
        out[f.name] = _jsonable(getattr(obj, f.name))
    return out


def _jsonable(v):
    if dataclasses.is_dataclass(v):
        return _plain(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    return v
