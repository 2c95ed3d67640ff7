"""Display helpers for the app: window presets, the slice + CAM composite, the colour bar,
the verdict card and the charts. Display only; every number comes from the Analysis.

The Grad-CAM overlay is drawn with the report's own colour function
(:func:`dicompipe.report.figures.cam_rgba`) on the same smoothed map
(:func:`dicompipe.report.figures.display_cam`), so the viewer and the report PNGs agree.
Slices are counted from 0 (z), as in the reports.

Example::

    >>> rgb = slice_rgb(hu_slice, window=(-600, 1500), cam=cam01, opacity=0.45,
    ...                 edges={"left": "R", "right": "L", "top": "A", "bottom": "P"})
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from dicompipe import organs
from dicompipe.types import RESEARCH_USE, Analysis

#: display windows (level, width) in HU; each organ's reading window (the one its report
#: images use) comes from the organ registry under the name it gives, and is its default
WINDOWS: dict[str, tuple[float, float]] = {
    "Lung": (-600.0, 1500.0),
    "Mediastinum": (40.0, 400.0),
    "Abdomen": (40.0, 400.0),
    "Pancreas": (40.0, 250.0),
    "Bone": (400.0, 1800.0),
}
WINDOWS.update({o.display.name: o.display_window for o in organs.all_organs()})
DEFAULT_WINDOW = {o.name: o.display.name for o in organs.all_organs()}

CSS = """
<style>
:root { --dp-teal: #0f6e7a; --dp-ink: #1f2a37; --dp-muted: #5b6775; --dp-line: #dfe5ea; }
.block-container { padding-top: 1.2rem; padding-bottom: 2rem; max-width: 1400px; }
div[data-testid="stMainBlockContainer"] { padding-top: 1.2rem; }
header[data-testid="stHeader"] { height: 2rem; background: transparent; }
section[data-testid="stSidebar"] { width: 320px !important; }
h1, h2, h3 { color: var(--dp-ink); letter-spacing: -0.01em; }
.dp-brand { font-size: 1.35rem; font-weight: 650; color: var(--dp-ink); margin: 0; }
.dp-sub { color: var(--dp-muted); font-size: 0.85rem; margin: 0 0 0.6rem 0; }
.dp-card { border: 1px solid var(--dp-line); border-radius: 10px; padding: 12px 18px;
           background: #fff; }
.dp-card .dp-kicker { color: var(--dp-muted); font-size: 0.78rem; text-transform: uppercase;
                      letter-spacing: 0.06em; margin-bottom: 2px; }
.dp-card .dp-label { font-size: 1.8rem; font-weight: 650; line-height: 1.15; }
.dp-card .dp-prob { font-size: 1.05rem; color: var(--dp-ink); margin-top: 2px; }
.dp-card .dp-meta { color: var(--dp-muted); font-size: 0.8rem; margin-top: 6px; line-height: 1.4; }
.dp-badge { display: inline-block; border-radius: 999px; padding: 1px 10px; font-size: 0.78rem;
            font-weight: 600; margin-left: 8px; vertical-align: middle; }
.dp-badge.unc { background: #fff4dc; color: #7a5200; border: 1px solid #f0d9a6; }
.dp-badge.ok { background: #e6f3f4; color: #0f5e68; border: 1px solid #c3e1e4; }
.dp-badge.test { background: #fde8e8; color: #8a1f1f; border: 1px solid #f3c1c1; }
.dp-disclaimer { font-size: 0.75rem; color: #6b4f00; background: #fffaf0;
                 border: 1px solid #f1e3bf; border-radius: 8px; padding: 4px 10px; margin-top: 8px; }
.dp-note { font-size: 0.85rem; color: #334155; background: #f5f7f9; border-left: 3px solid #9fb3c2;
           border-radius: 6px; padding: 8px 12px; margin: 4px 0 8px 0; }
.dp-note ul { margin: 0.2rem 0 0 1rem; padding: 0; }
.dp-disclaimer.inline { background: none; border: none; padding: 0; margin-top: 6px;
                        font-weight: 600; color: #8a6a10; }
.dp-note.small { font-size: 0.76rem; padding: 5px 10px; color: #475569; margin: 2px 0 6px 0; }
.dp-note.small ul { column-gap: 28px; margin-top: 1px; }
.dp-note.small.two ul { columns: 2; }
.dp-note.small li { margin: 0; break-inside: avoid; }
.dp-h { font-size: 0.95rem; font-weight: 600; color: var(--dp-ink); margin: 6px 0 2px 0; }
.dp-cbar { display: flex; align-items: center; gap: 8px; font-size: 0.78rem; color: var(--dp-muted);
           margin-top: 4px; }
.dp-cbar .bar { flex: 1; height: 12px; border-radius: 3px; border: 1px solid var(--dp-line); }
.dp-caption { font-size: 0.82rem; color: var(--dp-muted); margin-top: 4px; }
.dp-empty { color: var(--dp-muted); border: 1px dashed var(--dp-line); border-radius: 10px;
            padding: 28px; text-align: center; margin-top: 12px; }
div[data-testid="stMetricValue"] { font-size: 1.3rem; }
</style>
"""

_COLOURS = {"normal": "#3f8f6b", "benign": "#c08a2e", "malignant": "#b54747", "tumour": "#b54747"}
_FALLBACK = ["#3f6f9f", "#8a6fb0", "#6f8f3f", "#9f5f3f"]


def class_colour(label: str, i: int = 0) -> str:
    return _COLOURS.get(label.lower(), _FALLBACK[i % len(_FALLBACK)])


def pct(p: float) -> str:
    return f"{100 * p:.0f}%" if 0.01 <= p <= 0.99 else f"{100 * p:.1f}%"


def key_label(k, rank: int) -> str:
    """A key slice in the jump list, by its rank: ``#1 z 44 (99%, 100% in lung)``; the
    share of its Grad-CAM in the organ region only when the verdict ranked the slices there."""
    where = "" if k.in_region is None else f", {100 * k.in_region:.0f}% in lung"
    return f"#{rank} z {k.z} ({pct(k.probability)}{where})"


# --------------------------------------------------------------------------- image
def gray(slice2d: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """uint8 grey image: HU under (level, width), or 8-bit input as is (``window`` None)."""
    if window is None:
        return np.clip(slice2d, 0, 255).astype(np.uint8)
    from dicompipe.preprocess.render import window as hu_window
    return (hu_window(slice2d, *window) * 255).astype(np.uint8)


def orientation(a: Analysis) -> dict[str, str]:
    """Patient direction letter of each edge of the viewer's image, from the series'
    direction cosines (:func:`dicompipe.report.figures.edge_letters`)."""
    from dicompipe.report.figures import edge_letters
    return edge_letters(a.volume.image.GetDirection())


def _draw_letters(img, edges: dict[str, str]) -> None:
    """White R/L/A/P letters with a dark outline in the middle of each edge of ``img``."""
    from PIL import ImageDraw, ImageFont

    w, h = img.size
    size = max(14, round(min(w, h) / 24))
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:                                    # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    d = ImageDraw.Draw(img)
    m = max(4, size // 3)
    spots = {"left": ((m, h / 2), "lm"), "right": ((w - m, h / 2), "rm"),
             "top": ((w / 2, m), "mt"), "bottom": ((w / 2, h - m), "mb")}
    for edge, (xy, anchor) in spots.items():
        if edges.get(edge):
            d.text(xy, edges[edge], fill=(255, 255, 255), font=font, anchor=anchor,
                   stroke_width=max(2, size // 8), stroke_fill=(0, 0, 0))


def slice_rgb(slice2d: np.ndarray, window: tuple[float, float] | None,
              cam: np.ndarray | None = None, opacity: float = 0.5,
              spacing_xy: tuple[float, float] = (1.0, 1.0), min_side: int = 512,
              edges: dict[str, str] | None = None) -> np.ndarray:
    """The viewer image: windowed CT with the CAM (already in [0, 1]) blended on top by the
    report's colour function, and the orientation letters ``edges`` (see
    :func:`orientation`) at the image's edges.

    The image is enlarged to at least ``min_side`` pixels and corrected for non-square
    pixels (``spacing_xy`` in mm).
    """
    from PIL import Image

    from dicompipe.report.figures import blend

    img = Image.fromarray(blend(gray(slice2d, window), cam, opacity))
    sx, sy = spacing_xy
    w, h = img.size
    h_mm = h * (sy / sx if sx > 0 else 1.0)
    f = max(1.0, min_side / max(w, h_mm))
    size = (max(1, round(w * f)), max(1, round(h_mm * f)))
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    if edges:
        _draw_letters(img, edges)
    return np.asarray(img)


def colorbar_html(label: str, scale: float, opacity: float = 1.0) -> str:
    """Colour bar of the overlay (on mid-grey; the low end fades out as on the image)."""
    from dicompipe.report.figures import blend

    m = np.linspace(0, 1, 11)
    rgb = blend(np.full((1, 11), 128, np.uint8), m[None], opacity)[0].astype(int)
    stops = ", ".join(f"rgb({r},{g},{b}) {100 * i / 10:.0f}%" for i, (r, g, b) in enumerate(rgb))
    return (f'<div class="dp-cbar"><span>0</span><div class="bar" style="background: '
            f'linear-gradient(90deg, {stops});"></div><span>{scale:.3g}</span></div>'
            f'<div class="dp-caption">Grad-CAM for <b>{html.escape(label)}</b> · one colour scale '
            f'for the whole volume (0 to its maximum), so a faint slice looks faint; the same '
            f'colours as the report images.</div>')


def series_rows(candidates, chosen, include_phi: bool) -> list[dict]:
    """The "Series found" table's rows: every value a readable string ("—" where the header
    has none, never "None")."""
    def txt(v, fmt: str = "{}") -> str:
        return "—" if v is None or v == "" else fmt.format(v)

    rows = []
    for s in candidates:
        r = {"chosen": "●" if s.key == chosen.key else "",
             "series": txt(s.series_number), "description": txt(s.series_description),
             "type": txt(s.modality or s.kind), "images": txt(s.n_instances),
             "thickness mm": txt(s.slice_thickness, "{:g}"), "orientation": txt(s.orientation),
             "usable": "yes" if s.usable else f"no — {s.unusable_reason or 'not a volume'}"}
        if include_phi:
            r.update(patient=txt(s.patient_name), patient_id=txt(s.patient_id),
                     study_date=txt(s.study_date))
        rows.append(r)
    return rows


# --------------------------------------------------------------------------- verdict
def badge_html(conf) -> str:
    """The confidence badge: exactly ``model.confidence``'s status, its reasons as tooltip."""
    cls = "ok" if conf.status == "confident" else "unc"
    tip = html.escape("; ".join(conf.reasons) or "outside the uncertain band, in distribution, "
                      f"and the bundle meets the bar ({conf.bar})", quote=True)
    return (f'<span class="dp-badge {cls}" data-testid="confidence-badge" title="{tip}">'
            f'{html.escape(conf.status)}</span>')


def verdict_card_html(a: Analysis, test_model: bool = False) -> str:
    from dicompipe.model.confidence import confidence_of, performance_text

    v = a.verdict
    conf = confidence_of(a)
    p = v.probabilities.get(v.class_label, 0.0)
    colour = (class_colour(v.label, a.predictions.labels.index(v.label))
              if v.label in a.predictions.labels else "#5b6775")
    hi = v.uncertain_band[1]
    badge = badge_html(conf)
    if test_model or not a.model.get("trained", True):
        badge += '<span class="dp-badge test">untrained model</span>'
    m = a.model
    n_skip = sum(1 for s in a.batch.slices if not s.included)
    ood = v.ood
    n_out = len(ood.out_rows) if ood is not None and ood.available else 0
    meta = [f"{html.escape(a.organ.title())} CT ({html.escape(a.organ_reason)}) · "
            f"{v.n_slices} slices in the verdict" + (f", {n_skip} skipped" if n_skip else "")
            + (f", {n_out} out of distribution" if n_out else ""),
            f"Key slices: evidence for <b>{html.escape(v.evidence)}</b>, ranked by "
            f"{html.escape(v.ranked_by)}",
            f"Measured performance: {html.escape(performance_text(conf.performance))}",
            "OOD check: " + html.escape(
                (ood.note if ood is not None and not ood.available else None)
                or ("not available" if ood is None else
                    f"{n_out} of {len(ood.scores)} slices above {ood.slice_threshold:.3g}")),
            f"Uncertain at or below {pct(hi)} · {html.escape(v.rule)} · "
            f"T = {v.temperature:.2f} · model {html.escape(str(m.get('name', '?')))} "
            f"{html.escape(str(m.get('version', '')))}"]
    if conf.reasons:
        meta.insert(1, "Why not confident: " + html.escape("; ".join(
            r.split(": ", 1)[-1] for r in conf.reasons)))
    prob = (f'Calibrated probability <b>{pct(p)}</b>' if v.assessable else
            f'{html.escape(v.reason or "")} · the model\'s output ({html.escape(v.class_label)} '
            f'{pct(p)}) is shown for transparency only')
    return (
        f'<div class="dp-card" data-testid="verdict-card">'
        f'<div class="dp-kicker">Volume-level result</div>'
        f'<div class="dp-label" style="color:{colour}">{html.escape(v.label.title())}{badge}</div>'
        f'<div class="dp-prob">{prob}</div>'
        f'<div class="dp-meta">{"<br>".join(meta)}</div>'
        f'<div class="dp-disclaimer inline">{html.escape(RESEARCH_USE)}</div></div>')


def notes_small_html(warnings: list[str]) -> str:
    """The pipeline's warnings, compact: visible, not alarming."""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    two = " two" if len(warnings) > 2 else ""
    return (f'<div class="dp-note small{two}" data-testid="pipeline-notes"><b>Notes from the '
            f'pipeline ({len(warnings)})</b><ul>{items}</ul></div>')


def notes_html(warnings: list[str], title: str = "Notes from the pipeline") -> str:
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="dp-note"><b>{html.escape(title)}</b><ul>{items}</ul></div>'


# --------------------------------------------------------------------------- charts
def prob_chart(a: Analysis):
    """Volume-level probability per class: one bar each, the value written at the bar's end
    (inside it when it is long), the uncertain band shaded; at least 150 px tall, so two
    classes read as easily as three."""
    import altair as alt
    import pandas as pd

    labels = list(a.verdict.probabilities)
    df = pd.DataFrame({"class": [l.title() for l in labels],
                       "probability": [a.verdict.probabilities[l] for l in labels],
                       "colour": [class_colour(l, i) for i, l in enumerate(labels)]})
    df["text"] = df["probability"].map(pct)
    base = alt.Chart(df).encode(
        y=alt.Y("class:N", sort=None, title=None,
                axis=alt.Axis(labelFontSize=14, labelPadding=8, ticks=False, domain=False)),
        x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]),
                title="calibrated probability (whole volume)",
                axis=alt.Axis(format="%", tickCount=5, labelFontSize=12, titleFontSize=12,
                              titleFontWeight="normal", titleColor="#5b6775", grid=True)))
    bars = base.mark_bar(cornerRadiusEnd=3, height=30).encode(
        color=alt.Color("colour:N", scale=None), tooltip=["class", "text"])
    outside = base.transform_filter(alt.datum.probability < 0.8).mark_text(
        align="left", dx=6, fontSize=14, fontWeight="bold", color="#1f2a37").encode(text="text:N")
    inside = base.transform_filter(alt.datum.probability >= 0.8).mark_text(
        align="right", dx=-6, fontSize=14, fontWeight="bold", color="white").encode(text="text:N")
    lo, hi = a.verdict.uncertain_band
    band = alt.Chart(pd.DataFrame({"lo": [lo], "hi": [hi]})).mark_rect(
        color="#f0d9a6", opacity=0.35).encode(x="lo:Q", x2="hi:Q")
    return (band + bars + outside + inside).properties(height=max(150, 46 * len(labels) + 40))


def z_curve_frame(a: Analysis) -> Any:
    """Long table for the per-slice curve: slice z (from 0, the slider's and the reports'
    numbering), class, p."""
    import pandas as pd

    rows = []
    key_z = {k.z for k in a.verdict.key_slices}
    for r in a.slice_table():
        if not r.get("included") or "probabilities" not in r:
            continue
        for l, p in r["probabilities"].items():
            rows.append({"slice": int(r["z"]), "class": l.title(), "probability": float(p),
                         "key": r["z"] in key_z})
    return pd.DataFrame(rows, columns=["slice", "class", "probability", "key"])


def z_curve(a: Analysis, current: int, z_range: tuple[int, int]):
    """Per-slice calibrated probabilities along z (from 0, ``z_range`` = first and last
    slice); key slices ringed; the current slice ``current`` marked; click a point to jump."""
    import altair as alt
    import pandas as pd

    df = z_curve_frame(a)
    labels = [l.title() for l in a.predictions.labels]
    colours = [class_colour(l, i) for i, l in enumerate(a.predictions.labels)]
    z0, z1 = z_range
    x = alt.X("slice:Q", title="slice z (from 0)",
              scale=alt.Scale(domain=[z0, max(z0 + 1, z1)], nice=False),
              axis=alt.Axis(format="d", tickMinStep=1, titleFontWeight="normal",
                            titleColor="#5b6775"))
    y = alt.Y("probability:Q", title=None, scale=alt.Scale(domain=[0, 1]),
              axis=alt.Axis(format="%", tickCount=3))
    colour = alt.Color("class:N", scale=alt.Scale(domain=labels, range=colours),
                       legend=alt.Legend(orient="right", title=None, labelFontSize=11,
                                         symbolSize=60, padding=0, offset=6))
    pick = alt.selection_point(name="pick", fields=["slice"], on="click", nearest=True,
                               empty=False)
    lines = alt.Chart(df).mark_line(strokeWidth=2, interpolate="monotone").encode(x=x, y=y, color=colour)
    pts = alt.Chart(df).mark_circle(size=38, opacity=0.85).encode(
        x=x, y=y, color=colour,
        tooltip=[alt.Tooltip("slice:Q"), "class:N", alt.Tooltip("probability:Q", format=".0%")]
    ).add_params(pick)
    verdict = a.verdict.evidence.title()           # key slices show this class's evidence
    keys = alt.Chart(df[(df["key"]) & (df["class"] == verdict)]).mark_point(
        shape="diamond", size=150, filled=False, strokeWidth=2, color="#1f2a37").encode(
        x=x, y=y, tooltip=[alt.Tooltip("slice:Q", title="key slice")])
    cur = alt.Chart(pd.DataFrame({"slice": [current]})).mark_rule(
        color="#0f6e7a", strokeDash=[4, 3], strokeWidth=1.5).encode(x=x)
    return (cur + lines + pts + keys)
