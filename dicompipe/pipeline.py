"""``analyze()``: the one orchestrator that the CLI, the UI and batch runners call.

Example::

    >>> import dicompipe
    >>> a = dicompipe.analyze("study/", organ="lung")
    >>> print(a.verdict.label, a.verdict.probabilities)
"""
from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from dicompipe import io
from dicompipe.errors import DicompipeError, UnreadableSeries, UnsupportedInput
from dicompipe.types import Analysis

ORGANS = ("lung", "pancreas")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: progress callback: (stage name, fraction done 0..1, message)
Progress = Callable[[str, float, str], None]


def load_config(organ: str, path: str | Path | None = None) -> dict:
    """The pipeline settings for an organ (``configs/<organ>.yaml``) or from ``path``."""
    if organ not in ORGANS:
        raise UnsupportedInput(f"Unknown organ {organ!r}: choose one of {', '.join(ORGANS)} or 'auto'.")
    p = Path(path) if path else CONFIG_DIR / f"{organ}.yaml"
    try:
        return yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise DicompipeError(f"Cannot read pipeline config {p}: {e.strerror}.") from e


def analyze(path, organ: str = "auto", model=None, *, series: str | None = None,
            device: str = "auto", backend: str = "auto", cam: bool = True,
            select_slices: bool = True, config: str | Path | None = None,
            batch_size: int = 16, include_phi: bool = False,
            progress: Progress | None = None, allow_untrained: bool = False,
            max_memory=None) -> Analysis:
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
    Raises a :class:`dicompipe.DicompipeError` subclass with a clear message on bad input.
    """
    from dicompipe import explain, model as model_stage, preprocess

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
        conf = load_config(name, config)
        # model may be a dict organ -> bundle/name (e.g. the web app's preloaded bundles)
        m = model.get(name) if isinstance(model, dict) else model
        b = model_stage.load_bundle(m or conf["model"], organ=name,
                                    allow_untrained=allow_untrained)
        return name, why, conf, b

    if organ != "auto":      # a wrong or untrained bundle fails before any pixel is read
        organ, organ_reason, cfg, bundle = organ_and_bundle(None)
        lap("load_model")
    volume = io.load(chosen, max_memory=max_memory)
    _check_volume(volume)
    lap("load")
    if organ == "auto":
        organ, organ_reason, cfg, bundle = organ_and_bundle(volume)
        lap("load_model")

    say("preprocess", 0.25, "Windowing, resampling and selecting slices")
    sel = cfg.get("slice_selection", {})
    batch = preprocess.prepare(volume, bundle.spec, organ=organ,
                               select_slices=select_slices and sel.get("enabled", True),
                               selection=sel, render_ahead=True)
    lap("preprocess")

    say("predict", 0.4, f"Classifying {len(batch.included)} slices")
    preds = model_stage.predict(
        bundle, batch, device=device, backend=backend, batch_size=batch_size,
        progress=(lambda f: say("predict", 0.4 + 0.4 * f, "Classifying slices")) if progress else None)
    batch.wait_rows()
    lap("predict")
    from dicompipe.model import calibration, confidence, ood as ood_stage
    ood = ood_stage.check(bundle.ood(), preds.features)
    lap("ood")
    agg = {k: v for k, v in (cfg.get("aggregation") or {}).items() if v is not None}
    verdict = model_stage.aggregate(preds, bundle=bundle, ood=ood, **agg)
    verdict.confidence = confidence.assess(verdict, bundle.card(),
                                           calibration.input_kind(volume.windowed))
    lap("aggregate")

    cams = None
    if cam:
        say("explain", 0.85, "Grad-CAM for every analysed slice")
        cams = explain.gradcam(preds)
        lap("explain")

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


_ORGAN_WORDS = {
    "lung": ("CHEST", "LUNG", "THORAX", "THORACIC", "TORSO_CHEST", "PULM"),
    "pancreas": ("ABDOMEN", "PANCREAS", "ABD", "PELVIS", "LIVER", "ABDOMINAL"),
}


def _resolve_organ(organ: str, series, volume) -> tuple[str, str]:
    """Pick the organ for "auto" from header words, else from the lung-air fraction."""
    if organ != "auto":
        if organ not in ORGANS:
            raise UnsupportedInput(
                f"Unknown organ {organ!r}: choose one of {', '.join(ORGANS)} or 'auto'.")
        return organ, "given by the user"
    text = " ".join(filter(None, [series.body_part, series.series_description])).upper()
    for name, words in _ORGAN_WORDS.items():
        hit = next((w for w in words if w in text.split() or w in text), None)
        if hit:
            return name, f"auto: header says {hit!r} (BodyPartExamined/SeriesDescription)"
    if volume.windowed:
        raise UnsupportedInput(
            "Cannot choose the organ automatically for already-windowed PNG/JPG slices "
            "(no headers, no Hounsfield units): pass --organ lung or --organ pancreas.")
    from dicompipe.preprocess.selection import lung_fractions
    frac = float(np.median(lung_fractions(volume.array)))
    if frac > 0.15:
        return "lung", (f"auto: median lung-air fraction {frac:.2f} of the body per slice "
                        "> 0.15 (no header hint)")
    return "pancreas", (f"auto: median lung-air fraction {frac:.2f} of the body per slice "
                        "<= 0.15 (no header hint)")
