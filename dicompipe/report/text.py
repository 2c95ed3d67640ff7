"""``report.txt``: the human-readable report of one analysis.

Sections: disclaimer, input provenance (patient identifiers, paths, file names and
SeriesDescription only with ``include_phi``; otherwise pseudonymised, see :mod:`dicompipe.phi`),
model, verdict (or "not assessable" and why) with its confidence status, the bundle's
measured test performance, calibrated probability per class, the uncertain band, what the
calibration was fitted on and its ECE per input kind, the OOD check, key slices and the
class whose evidence they show (InstanceNumber, SOPInstanceUID), analysed/skipped/left-out
slices and why, explanation, warnings, timings, and the files written.

Example::

    >>> from dicompipe.report import text
    >>> print(text.render(analysis))
    >>> text.write(analysis, "out/report.txt")
"""
from __future__ import annotations

import collections
import datetime as _dt
import textwrap
from pathlib import Path

from dicompipe.model.calibration import input_kind
from dicompipe.model.confidence import confidence_of, performance_text
from dicompipe.types import RESEARCH_USE, Analysis
from dicompipe.util import write_text

WIDTH = 78


def _h(title: str) -> list[str]:
    return ["", title, "-" * len(title)]


def _kv(key: str, value) -> str:
    return f"  {key + ':':<22}{'-' if value in (None, '', [], ()) else value}"


def _bullets(items) -> list[str]:
    return [textwrap.fill(str(i), WIDTH, initial_indent="  - ", subsequent_indent="    ")
            for i in items]


def _fmt_mm(v) -> str:
    if v is None:
        return None
    if isinstance(v, (tuple, list)):
        return " x ".join(f"{x:g}" for x in v) + " mm"
    return f"{v:g} mm"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent)


def _calibration_lines(cal: dict | None, windowed: bool) -> list[str]:
    """What the temperature was fitted on and its ECE per input kind (this input's marked)."""
    cal = cal or {}
    kind = input_kind(windowed)
    out = [_kv("Calibration", f"{cal.get('method') or 'not recorded'}")]
    out += _wrap(f"fitted on: {cal.get('fitted_on') or 'not recorded in the bundle'}", "    ")
    ece = cal.get("ece")
    if not ece:
        out.append(f"    ECE per input kind: not recorded in the bundle (this input: {kind})")
        return out
    for k, v in ece.items():
        val = f"{v:.3f}" if isinstance(v, (int, float)) else (v or "not measured")
        out.append(f"    ECE on {k}: {val}" + ("   <- this input" if k == kind else ""))
    if kind not in ece:
        out.append(f"    ECE on {kind} (this input): not measured")
    return out


def _ood_lines(ood) -> list[str]:
    if ood is None or not ood.available:
        return [_kv("Out-of-distribution", (ood.note if ood is not None else None)
                    or "not available: the bundle has no OOD model")]
    n_out, n = len(ood.out_rows), len(ood.scores)
    state = "OUT OF DISTRIBUTION" if ood.out_of_distribution else "in distribution"
    out = [_kv("Out-of-distribution", f"{state}: {n_out} of {n} analysed slices above the "
               f"slice threshold {ood.slice_threshold:.4g} ({ood.method})")]
    out += _wrap(f"volume rule: {ood.volume_rule}; slices above the threshold are left out "
                 "of the verdict", "    ")
    return out


def render(analysis: Analysis, *, include_phi: bool = False, files: list[str] | None = None,
           notes: list[str] | None = None) -> str:
    """The report text. ``files``: names written in the run folder; ``notes``: writer notes."""
    a = analysis
    s = a.series
    vd = a.verdict
    out = ["dicompipe analysis report", "=" * WIDTH, RESEARCH_USE,
           "Research software output; it has not been validated for any clinical purpose.",
           _kv("Analysis created", a.created or "-"),
           _kv("Report written",
               _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))]

    out += _h("Input")
    out += [_kv("Path", a.input), _kv("Kind", s.kind),
            _kv("Series", (s.series_description if include_phi else None) or s.key),
            _kv("Series number", s.series_number), _kv("Modality", s.modality),
            _kv("StudyInstanceUID", s.study_instance_uid or "(missing in source)"),
            _kv("SeriesInstanceUID", s.series_instance_uid or "(missing in source)"),
            _kv("Body part", s.body_part),
            _kv("Instances", s.n_instances),
            _kv("Matrix", f"{s.rows} x {s.columns}" if s.rows and s.columns else None),
            _kv("Pixel spacing", _fmt_mm(s.pixel_spacing)),
            _kv("Slice thickness", _fmt_mm(s.slice_thickness)),
            _kv("Slice spacing", ", ".join(f"{k} {v:g}" for k, v in s.spacing_stats.items())
                + " mm" if s.spacing_stats else None),
            _kv("Transfer syntax", s.transfer_syntax),
            _kv("Chosen because", s.reason)]
    others = [c for c in a.candidates if c.key != s.key]
    if others:
        out.append(_kv("Other series", len(others)))
        for c in others:
            why = c.unusable_reason if not c.usable else "usable, not chosen"
            name = (c.series_description if include_phi else None) or c.key
            out.append(f"    - {name} ({c.n_instances} inst.): {why}")
    if include_phi:
        out += [_kv("Patient ID", s.patient_id), _kv("Patient name", s.patient_name),
                _kv("Study date", s.study_date)]
    else:
        out.append(_kv("Patient", "withheld (write with --include-phi to show)"))
    z, y, x = a.volume.shape
    out.append(_kv("Volume", f"{z} slices of {y} x {x}, spacing "
                   + _fmt_mm(tuple(round(v, 4) for v in a.volume.image.GetSpacing()))
                   + (" (8-bit windowed input, not HU)" if a.volume.windowed else " (HU)")))

    m = a.model or {}
    out += _h("Model")
    out += [_kv("Name", m.get("name")), _kv("Version", m.get("version")),
            _kv("Weights sha256", m.get("sha256")), _kv("Organ", f"{a.organ} ({a.organ_reason})")]
    info = a.predictions.model_info or {}
    if info.get("backend"):
        out.append(_kv("Inference", f"{info['backend']} on {info.get('device', 'cpu')}, "
                                    f"{info.get('threads', '?')} threads, batch {info.get('batch_size', '?')}"))
    for k in ("task", "intended_use", "training_data"):
        if m.get(k):
            out.append(_kv(k.replace("_", " ").capitalize(), m[k]))

    out += _h("Verdict")
    conf = confidence_of(a)
    p_top = vd.probabilities.get(vd.class_label, 0.0)
    if vd.assessable:
        out.append(f"  {vd.label.upper()}   calibrated probability {p_top:.3f}"
                   + ("   ** UNCERTAIN **" if vd.uncertain else ""))
    else:
        out.append(f"  {vd.label.upper()}: {vd.reason}")
        out += _wrap("The class probabilities below are the model's output on this input, "
                     "shown for transparency only: they are NOT a verdict.")
    out.append(_kv("Confidence status", conf.status))
    out += _bullets(conf.reasons)
    out.append("  Measured performance (the bundle's card):")
    out += _wrap(performance_text(conf.performance), indent="    ")
    out.append("  Confident only if:")
    out += _wrap(f"outside the uncertain band, in distribution, and {conf.bar}", "    ")
    lo, hi = vd.uncertain_band
    out.append(f"  Uncertain band [{lo:.2f}, {hi:.2f}]: a top probability at or below {hi:.2f} "
               "is reported as uncertain.")
    out.append("  Calibrated probability per class"
               + (" (transparency only, not a verdict):" if not vd.assessable else ":"))
    for lab, p in vd.probabilities.items():
        bar = "#" * int(round(p * 40))
        out.append(f"    {lab:<12}{p:6.3f}  {bar}")
    out.append(_kv("Aggregation", f"{vd.rule}, temperature {vd.temperature:.3g}, "
                   f"over {vd.n_slices} slices"))
    out += _calibration_lines(m.get("calibration"), a.volume.windowed)
    out += _ood_lines(vd.ood)

    ev = vd.evidence
    out += _h(f"Key slices (decided the verdict): evidence for {ev}")
    if ev != vd.class_label and vd.assessable:
        out += _wrap(f"The verdict is {vd.label} because the evidence for {ev} on these "
                     f"slices was low under the rule {vd.rule}; they are the slices that "
                     "decided it.")
    elif not vd.assessable:
        out += _wrap(f"Shown for transparency only: where the model's evidence for {ev} was "
                     "strongest; the input is not assessable.")
    if vd.region:
        out += _wrap(f"Slices ranked by the {ev} Grad-CAM mass inside the {vd.region}, so "
                     "evidence outside the organ (e.g. under the diaphragm) ranks last; \"in "
                     "region\" is the share of the slice's map that lies there.")
    if vd.key_slices:
        region_col = f" {'in region':>9}" if vd.region else ""
        p_head = f"P({ev})"
        pw = max(10, len(p_head))
        out.append(f"  {'#':>2} {'grid z':>6} {'vol z':>6} {'Instance':>8} {p_head:>{pw}}"
                   f"{region_col}  SOPInstanceUID")
        for i, k in enumerate(vd.key_slices, 1):
            inst = ",".join("-" if n is None else str(n) for n in k.instance_numbers) or "-"
            uids = ",".join(u or "-" for u in k.sop_instance_uids) or "-"
            vz = ",".join(str(v) for v in k.volume_z) or "-"
            share = f" {100 * k.in_region:>8.0f}%" if vd.region and k.in_region is not None else \
                (f" {'-':>9}" if vd.region else "")
            out.append(f"  {i:>2} {k.z:>6} {vz:>6} {inst:>8} {k.probability:>{pw}.3f}{share}  {uids}")
    else:
        out.append("  none")

    table = a.slice_table()
    n_inc = sum(r["included"] for r in table)
    reasons = collections.Counter(r["skip_reason"] or "no reason given"
                                  for r in table if not r["included"])
    out += _h("Slices")
    out.append(f"  {n_inc} of {len(table)} model slices analysed, {len(table) - n_inc} skipped.")
    out.append("  Slices are counted from 0 (z 0 = the first slice), as in the figures and the "
               "web app.")
    for why, n in reasons.most_common():
        out.append(f"    skipped {n}: {why}")
    labels = a.predictions.labels
    out.append("")
    out.append(f"  {'z':>4} {'Instance':>8}  " + " ".join(f"{l[:9]:>9}" for l in labels)
               + "  status")
    keyz = {k.z for k in vd.key_slices}
    for r in table:
        inst = ",".join("-" if n is None else str(n) for n in r["instance_numbers"]) or "-"
        if r["included"] and "probabilities" in r:
            ps = " ".join(f"{r['probabilities'][l]:>9.3f}" for l in labels)
            status = "key" if r["z"] in keyz else "analysed"
            if r.get("excluded_reason"):
                status += f", left out: {r['excluded_reason']}"
            if r.get("ood_score") is not None:
                status += f" (OOD {r['ood_score']:.3g})"
        else:
            ps = " ".join(f"{'':>9}" for _ in labels)
            status = f"skipped: {r['skip_reason'] or '-'}"
        out.append(f"  {r['z']:>4} {inst:>8}  {ps}  {status}")

    out += _h("Explanation")
    if not a.volume.windowed:
        from dicompipe.report.figures import display_window
        lvl, wid = display_window(a)
        model_w = ", ".join(f"L {l:g}/W {w:g}" for l, w in a.batch.spec.windows)
        out.append(_kv("Images shown at", f"window L {lvl:g}/W {wid:g} HU "
                       f"(model input: {model_w})"))
    if a.cams is None:
        out.append("  No Grad-CAM (run without --no-cam for explanation maps).")
    else:
        out.append(_kv("Method", a.cams.method))
        out.append(_kv("Map maximum", ", ".join(f"{l} {v:.4g}" for l, v in a.cams.scale.items())))
        out.append(textwrap.fill(
            "Each class's overlay is scaled to its map maximum over the whole volume, so its "
            "brightest colour means the same on every slice (raw Grad-CAM units: comparable "
            "between slices, not between classes); the outline marks >= 50 % of it.", WIDTH,
            initial_indent="  ", subsequent_indent="  "))
        if a.cams.faithfulness:
            out.append(_kv("Faithfulness", ", ".join(
                f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} {v}"
                for k, v in a.cams.faithfulness.items())))

    out += _h("Warnings")
    out += _bullets(a.warnings) or ["  none"]

    out += _h("Timings (seconds)")
    if a.timings:
        out += [f"  {k:<14}{v:8.2f}" for k, v in a.timings.items()]
        out.append(f"  {'total':<14}{sum(a.timings.values()):8.2f}")
    else:
        out.append("  not recorded")

    if notes:
        out += _h("Notes on the outputs")
        out += _bullets(notes)
    if files:
        out += _h("Files in this folder")
        out += [f"  {f}" for f in files]
    out += ["", RESEARCH_USE, ""]
    if include_phi:
        return "\n".join(out)
    from dicompipe.phi import Redactor
    return Redactor.for_analysis(a).text("\n".join(out))


def write(analysis: Analysis, path: str | Path, *, include_phi: bool = False,
          files: list[str] | None = None, notes: list[str] | None = None) -> Path:
    """Write :func:`render`'s text to ``path`` atomically; returns ``path``."""
    return write_text(path, render(analysis, include_phi=include_phi, files=files, notes=notes))
