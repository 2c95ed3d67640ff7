"""The one way through the stages. ``analyze()`` runs them on one CT; ``run_case()`` also
writes the reports and records the case history, with one failure policy: every front end
(the CLI, the web app, a listener or a batch) calls ``run_case``. See docs/architecture.md.

Example::

    >>> import dicompipe
    >>> a = dicompipe.analyze("study/", organ="lung")
    >>> print(a.verdict.label, a.verdict.probabilities)
    >>> res = dicompipe.run_case("study/", organ="lung", out="runs")
    >>> res.run_dir, res.record_id, res.errors
"""
from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from dicompipe import history as case_history
from dicompipe import io, organs, report
from dicompipe.errors import UnreadableSeries, UnsupportedInput
from dicompipe.types import Analysis, CaseResult

#: progress callback: (stage name, fraction done 0..1, message)
Progress = Callable[[str, float, str], None]


def analyze(path, organ: str = "auto", model=None, *, series: str | None = None,
            device: str = "auto", backend: str = "auto", cam: bool = True,
            select_slices: bool = True, config: str | Path | None = None,
            batch_size: int | None = None, include_phi: bool = False,
            progress: Progress | None = None, allow_untrained: bool = False,
            max_memory=None, spacing=None) -> Analysis:
    """Analyse one CT: discover -> select -> load -> prepare -> predict -> aggregate -> Grad-CAM.

    ``organ``: "lung", "pancreas" or "auto" (from BodyPartExamined/descriptions, else content).
    ``model``: a bundle name, folder or loaded ``Bundle`` (default: the organ config's
    built-in bundle), or a dict organ -> one of those, so "auto" can use preloaded bundles.
    ``series``: force a series by SeriesInstanceUID, series number or discover key.
    ``progress``: optional callback ``(stage, fraction, message)``; silent when None.
    ``allow_untrained``: accept a bundle whose metadata says ``"trained": false`` (tests,
    benchmarks); the CLI never sets it, so random weights never produce a printed verdict.
    ``max_memory``: bytes (or "4G") loading may use, checked before the volume is allocated
    (default: 75 % of the available memory; see :mod:`dicompipe.io.limits`).
    ``spacing``: (x, y, z) mm of PNG/JPG slices, which carry none (default 1 mm; ignored
    for DICOM and NIfTI, whose headers say it).
    Raises a :class:`dicompipe.DicompipeError` subclass with a clear message on bad input.
    """
    from dicompipe import explain, preprocess
    from dicompipe import model as model_stage

    say = progress or (lambda *a: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 4)
        t0 = now

    say("discover", 0.0, f"Reading headers under {path}")
    candidates = io.discover(path)
    lap("discover")
    chosen = io.select(candidates, series=series)
    lap("select")
    say("load", 0.1, f"Loading series {chosen.series_description or chosen.key}")
    _check_series(chosen)

    def organ_and_bundle(vol):
        name, why = _resolve_organ(organ, chosen, vol)
        conf = organs.load(name, config)
        # model may map organ -> bundle/name (the web app's preloaded bundles, an Analyzer's)
        m = model.get(name) if isinstance(model, Mapping) else model
        b = model_stage.load_bundle(m or conf.model, organ=name,
                                    allow_untrained=allow_untrained)
        return name, why, conf, b

    if organ != "auto":      # a wrong or untrained bundle fails before any pixel is read
        organ, organ_reason, cfg, bundle = organ_and_bundle(None)
        lap("load_model")
    volume = io.load(chosen, max_memory=max_memory, spacing=spacing)
    _check_volume(volume)
    lap("load")
    if organ == "auto":
        organ, organ_reason, cfg, bundle = organ_and_bundle(volume)
        lap("load_model")
    _check_slices(volume, cfg)

    say("preprocess", 0.25, "Windowing, resampling and selecting slices")
    batch = preprocess.prepare(volume, bundle.spec, organ=organ,
                               select_slices=select_slices and cfg.selection.enabled,
                               selection=cfg.selection.rules(), render_ahead=True)
    lap("preprocess")

    say("predict", 0.4, f"Classifying {len(batch.included)} slices")
    preds = model_stage.predict(
        bundle, batch, device=device, backend=backend, batch_size=batch_size,
        progress=(lambda f: say("predict", 0.4 + 0.4 * f, "Classifying slices")) if progress else None)
    batch.wait_rows()
    lap("predict")
    from dicompipe.model import calibration, confidence
    from dicompipe.model import ood as ood_stage
    ood = ood_stage.check(bundle.ood(), preds.features)
    lap("ood")
    cams = None
    if cam:
        say("explain", 0.85, "Grad-CAM for every analysed slice")
        cams = explain.gradcam(preds)
        lap("explain")
    (evidence, share), region = _organ_region(cfg, volume, batch, preds, cams)
    lap("region")
    verdict = model_stage.aggregate(preds, bundle=bundle, ood=ood, region_evidence=evidence,
                                    region_share=share, region=region, **cfg.aggregation.overrides())
    verdict.confidence = confidence.assess(verdict, bundle.card(),
                                           calibration.input_kind(volume.windowed))
    lap("aggregate")

    warnings = [*chosen.warnings, *volume.warnings, *batch.warnings]
    if not bundle.trained:
        warnings.append(f"Model bundle {bundle.name!r} is UNTRAINED (random/fixture weights): "
                        "this verdict is meaningless.")
    if not verdict.assessable:
        warnings.append(f"Not assessable: {verdict.reason} ({len(ood.out_rows)} of "
                        f"{len(ood.scores)} analysed slices beyond the OOD threshold "
                        f"{ood.slice_threshold:.3g}); the class probabilities are shown for "
                        "transparency only.")
    elif ood.out_rows:
        warnings.append(f"{len(ood.out_rows)} of {len(ood.scores)} analysed slices are out of "
                        "distribution (input unlike the model's training data) and were left "
                        "out of the verdict.")
    if verdict.assessable and verdict.uncertain:
        warnings.append(f"Uncertain verdict: top probability {max(verdict.probabilities.values()):.2f} "
                        f"is at or below {verdict.uncertain_band[1]:.2f} (the uncertain band's "
                        "upper end).")
    return Analysis(
        input=str(path), organ=organ, organ_reason=organ_reason, series=chosen,
        candidates=candidates, volume=volume, batch=batch, predictions=preds,
        verdict=verdict, cams=cams, model=bundle.card(), timings=timings,
        warnings=list(dict.fromkeys(warnings)),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        include_phi=include_phi)


def _organ_region(cfg, volume, batch, preds, cams):
    """((mass, share) (n, K) of each slice's Grad-CAM inside the organ region, its
    description) for an organ with ``evidence_region`` on HU input; ((None, None), None)
    otherwise. The lung fields are widened by half a class-map cell: the map cannot place
    evidence more finely than that."""
    if cfg.evidence_region != "lung_fields" or volume.windowed or batch.grid is None \
            or preds.features is None or not batch.included:
        return (None, None), None
    import SimpleITK as sitk

    from dicompipe.explain import class_maps, evidence_inside
    from dicompipe.preprocess.region import lung_fields, model_space
    maps = cams.maps if cams is not None and cams.labels == list(preds.labels) \
        else class_maps(preds.features, preds.head_weight)
    spacing = float(batch.grid.GetSpacing()[0])
    margin = int(batch.pad[2]) * spacing / (2 * maps.shape[-1])
    fields, step = lung_fields(sitk.GetArrayViewFromImage(batch.grid), spacing, margin,
                               air_hu=cfg.selection.lung_air_hu[1], body_hu=cfg.selection.body_hu)
    inside = evidence_inside(maps, model_space(batch, fields, step))
    return inside, (f"lung fields (the air-filled lung in 3D, widened by {margin:.0f} mm, half "
                   "a Grad-CAM cell)")


def run_case(input, *, organ: str = "auto", out: str | Path = "runs", formats=None,
             history: str | Path | bool | None = None, progress: Progress | None = None,
             cam_slices: str = "key", cam_nifti: str = "verdict", ct_nifti: bool | None = None,
             include_phi: bool = False,
             deidentify: bool = False, user: str | None = None, **options) -> CaseResult:
    """Analyse one case, write its report folder and record it in the case history.

    ``formats``: report formats, a list or "txt,png" (default: all but dicom, see
    :func:`dicompipe.report.parse_formats`); ``out``: parent of the new run folder;
    ``history``: the case-history database (None or True: the default one, False: do not
    record); ``cam_slices``, ``cam_nifti``, ``ct_nifti``, ``deidentify``: see :func:`dicompipe.report.write`; ``user``:
    the signed-in user recorded with the case (the web app's per-user history);
    ``include_phi`` goes to the analysis and the reports; other ``options`` (model, series,
    device, backend, cam, select_slices, config, batch_size, max_memory, allow_untrained)
    go to :func:`analyze`.

    Failure policy, the same for every front end:

    - a bad format list or an unusable history database raises before any work is done;
    - an analysis that fails raises; nothing is written or recorded;
    - a report folder is written in a hidden staging folder and renamed into place, so it
      is complete or absent; when it cannot be written the case is recorded as "failed"
      with the reason, and the error is returned in ``report_error``;
    - a history record that cannot be written is returned in ``history_error`` (the report
      folder stays).

    The caller decides how to show ``report_error``/``history_error`` (the CLI raises them,
    the web app shows them beside the result).

    >>> res = run_case("study/", organ="lung", out="runs", formats="txt,json", history=False)
    >>> res.ok, res.run_dir
    (True, PosixPath('runs/20260101-120000_lung'))
    """
    fmts = report.parse_formats(formats)
    record = history is not False
    db = None if history is None or isinstance(history, bool) else history
    if record:                       # a bad database fails before any work is done
        case_history.check(db, input_path=input)
    a = analyze(input, organ=organ, include_phi=include_phi, progress=progress, **options)
    res = CaseResult(a)
    if progress:
        progress("report", 0.95, ", ".join(f.upper() for f in fmts))
    try:
        res.run_dir = report.write(a, out, formats=fmts, cam_slices=cam_slices,
                                   cam_nifti=cam_nifti, ct_nifti=ct_nifti,
                                   include_phi=include_phi,
                                   deidentify=deidentify)
    except Exception as e:  # noqa: BLE001 - recorded as failed, returned to the caller
        res.report_error = e
    if record:
        if progress:
            progress("history", 0.98, "recording the case")
        try:
            if res.report_error is not None:
                res.record_id = case_history.record(a, report_dir=None, db=db, status="failed",
                                                    reason=str(res.report_error), user=user)
            else:
                res.record_id = case_history.record(a, report_dir=res.run_dir, db=db, user=user)
        except Exception as e:  # noqa: BLE001 - returned to the caller
            res.history_error = e
    if progress:
        progress("done", 1.0, "done")
    return res


def content_hash(path, *, series: str | None = None) -> str | None:
    """The content hash of the series ``analyze(path, series=series)`` would use, from the
    headers and the files' bytes only (no pixel decoding): the same value the case history
    records as ``input_hash``, and the key a batch resumes by. None when the files cannot
    be read; bad input raises as in :func:`analyze`.

    >>> content_hash("study/")
    '3f5a...'
    """
    found = io.discover(path)        # holds a zip's extraction folder while hashing
    chosen = io.select(found, series=series)
    return case_history.series_hash(chosen, path)


class Analyzer:
    """Many cases in one process, the fixed costs paid once: each organ's bundle is loaded
    on first use and kept with its compiled inference backend (the OpenVINO/ONNX Runtime
    session), so the second and later cases skip loading, hashing and compiling. What the
    library, a batch worker or a listener should hold.

    ``options`` are defaults for :func:`run_case`/:func:`analyze` (organ, out, formats,
    backend, device, history, ...); per-call keywords override them.

    >>> analyzer = Analyzer(organ="lung", out="runs", history=False)
    >>> for study in ["a/", "b/"]:
    ...     res = analyzer.run_case(study)
    """

    def __init__(self, *, model=None, config: str | Path | None = None,
                 allow_untrained: bool = False, **options):
        self.bundles = _Bundles(model, config, allow_untrained)
        self.options = {**options, "config": config, "allow_untrained": allow_untrained}

    def analyze(self, path, **overrides) -> Analysis:
        """:func:`analyze` with this analyzer's bundles and defaults."""
        own = _case_only()
        kw = {k: v for k, v in {**self.options, **overrides}.items() if k not in own}
        return analyze(path, model=self.bundles, **kw)

    def run_case(self, path, **overrides) -> CaseResult:
        """:func:`run_case` with this analyzer's bundles and defaults."""
        return run_case(path, model=self.bundles, **{**self.options, **overrides})


def _case_only() -> set[str]:
    """run_case's own parameters (not analyze's)."""
    import inspect
    return set(inspect.signature(run_case).parameters) - set(inspect.signature(analyze).parameters)


class _Bundles(Mapping):
    """organ -> loaded bundle, each loaded once on first ``get`` (the organ config's
    default bundle unless ``model`` names one, or maps organs to bundles)."""

    def __init__(self, model, config, allow_untrained: bool):
        self._model, self._config, self._allow = model, config, allow_untrained
        self._loaded: dict = {}

    def get(self, organ, default=None):
        if organ not in self._loaded:
            from dicompipe import model as model_stage
            m = self._model.get(organ) if isinstance(self._model, Mapping) else self._model
            self._loaded[organ] = model_stage.load_bundle(
                m or organs.load(organ, self._config).model, organ=organ,
                allow_untrained=self._allow)
        return self._loaded[organ]

    def __getitem__(self, organ):
        return self.get(organ)

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded)

    def __len__(self) -> int:
        return len(self._loaded)


_CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",    # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",    # Legacy Converted Enhanced CT Image Storage
}


def _check_series(series) -> None:
    """Refuse DICOM that is not CT (MR, PET, SC...) before loading any pixels."""
    if series.kind != "dicom":
        return
    modality = (series.modality or "").upper()
    if modality and modality != "CT":
        raise UnsupportedInput(
            f"Series {series.series_description or series.key} ({series.source}) is "
            f"{modality}, not CT: dicompipe analyses CT in Hounsfield units only. "
            "Choose a CT series with --series (see `dicompipe series PATH`).")
    if not modality and series.sop_class_uid and series.sop_class_uid not in _CT_SOP_CLASSES:
        raise UnsupportedInput(
            f"Series {series.key} ({series.source}) has SOP class {series.sop_class_uid} and no "
            "Modality: it is not a CT image series. Choose a CT series with --series.")


def _check_volume(volume) -> None:
    """A DICOM or NIfTI CT must be a volume: one slice (a single image, a 2-D NIfTI) is
    refused, clearly, the same way for both."""
    if volume.series.kind in ("dicom", "nifti") and volume.shape[0] < 2:
        what = "NIfTI" if volume.series.kind == "nifti" else "Series"
        raise UnreadableSeries(
            f"{what} {volume.series.key} ({volume.series.source}) has a single slice: a "
            "volume-level verdict needs a CT volume. Point dicompipe at the folder (or NIfTI) "
            "holding the whole series (or export the slice as PNG to analyse it as an image).")


def _check_slices(volume, cfg: organs.Organ) -> None:
    """The organ's ``series.min_slices``: fewer slices than that and the series is refused."""
    if volume.shape[0] < cfg.min_slices:
        raise UnreadableSeries(
            f"Series {volume.series.key} ({volume.series.source}) has {volume.shape[0]} "
            f"slice(s); the {cfg.name} settings ({cfg.source.name}) need at least "
            f"{cfg.min_slices} (series.min_slices).")


def _resolve_organ(organ: str, series, volume) -> tuple[str, str]:
    """Pick the organ for "auto" from header words, else from the lung-air fraction (the
    rules are in the organ registry, tried in its order)."""
    if organ != "auto":
        organs.get(organ)                       # UnsupportedInput for an unknown organ
        return organ, "given by the user"
    known = organs.all_organs()
    text = " ".join(filter(None, [series.body_part, series.series_description])).upper()
    for o in known:
        hit = next((w for w in o.header_words if w in text.split() or w in text), None)
        if hit:
            where = ("the folder name" if series.kind in ("image", "images") or volume.windowed
                     else "BodyPartExamined/SeriesDescription")
            return o.name, f"auto: {where} says {hit!r}"
    if volume.windowed:
        raise UnsupportedInput(
            "Cannot choose the organ automatically for already-windowed PNG/JPG slices "
            "(no headers, no Hounsfield units): pass "
            + " or ".join(f"--organ {o.name}" for o in known) + ".")
    from dicompipe.preprocess.selection import lung_fractions
    frac = float(np.median(lung_fractions(volume.array)))
    for o in known:
        if o.lung_air_above is not None and frac > o.lung_air_above:
            return o.name, (f"auto: median lung-air fraction {frac:.2f} of the body per slice "
                            f"> {o.lung_air_above:g} (no header hint)")
        if o.lung_air_at_most is not None and frac <= o.lung_air_at_most:
            return o.name, (f"auto: median lung-air fraction {frac:.2f} of the body per slice "
                            f"<= {o.lung_air_at_most:g} (no header hint)")
    raise UnsupportedInput(
        f"Cannot choose the organ automatically: no header hint, and the median lung-air "
        f"fraction {frac:.2f} fits no organ's rule. Pass --organ "
        + " or ".join(o.name for o in known) + ".")
