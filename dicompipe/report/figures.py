"""Figures for a report: annotated key slices, a montage, per-slice scores, verdict bars.

Every builder returns a :class:`matplotlib.figure.Figure` made without pyplot (no global
state, safe in a web app: ``st.pyplot(fig)``); :func:`save` writes one atomically and
:func:`to_rgb` renders one to pixels (the DICOM Secondary Capture uses that).

CAM overlays use the volume-consistent scale: colour 1.0 is ``CamStack.scale[label]``, the
maximum over the whole volume, so a weak slice looks weak. The hot region outlined is
CAM >= 50 % of that maximum. Legends sit in a panel below the image, never on the anatomy.

Example::

    >>> from dicompipe.report import figures
    >>> fig = figures.key_slice_figure(analysis, analysis.verdict.key_slices[0])
    >>> figures.save(fig, "out/key_01.png")
    >>> figures.save(figures.slice_scores_figure(analysis), "out/slice_scores.png")
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dicompipe import organs
from dicompipe.types import RESEARCH_USE, Analysis, KeySlice
from dicompipe.util import atomic_path

CAM_CMAP = "turbo"
HOT = 0.5                 # outline level, fraction of the volume-wide CAM maximum
SHOW_BELOW = 0.15         # CAM below this fraction is drawn transparent
DPI = 110
_CLASS_COLOURS = {"normal": "#2e8b57", "benign": "#e69f00", "malignant": "#d62728",
                  "tumour": "#d62728", "tumor": "#d62728"}
_FALLBACK = ["#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def class_colour(label: str, i: int = 0) -> str:
    """A fixed colour per class name (normal green, benign orange, malignant/tumour red)."""
    return _CLASS_COLOURS.get(label.lower(), _FALLBACK[i % len(_FALLBACK)])


# --------------------------------------------------------------------------- slice data
@dataclass
class SliceView:
    """One slice ready to draw: CT in [0, 1], CAM in [0, 1] of the volume maximum (or None)."""

    ct: np.ndarray
    cam: np.ndarray | None
    pixel_mm: tuple[float, float]                 # (row, column) spacing
    edges: dict[str, str]                         # orientation letter per edge
    volume_z: int
    z_mm: float
    instance_number: int | None
    sop_instance_uid: str | None
    probability: float | None                     # calibrated P(label) on this slice


def display_window(analysis: Analysis) -> tuple[float, float]:
    """The (level, width) used to show the CT: the organ's reading window (what a radiologist
    would use, from the organ registry), else the model's input window."""
    organ = organs.find(analysis.organ)
    return organ.display_window if organ else tuple(analysis.batch.spec.windows[0])


def _letter(v) -> str:
    i = int(np.argmax(np.abs(v)))
    return (("R", "L"), ("A", "P"), ("I", "S"))[i][int(v[i] > 0)]


def _edges(image) -> dict[str, str]:
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    x, y = d[:, 0], d[:, 1]
    return {"left": _letter(-x), "right": _letter(x), "top": _letter(-y), "bottom": _letter(y)}


def calibrated(analysis: Analysis) -> np.ndarray:
    """Calibrated per-slice probabilities (n_included, K), rows as in SlicePredictions."""
    K = len(analysis.predictions.labels)
    out = np.zeros((len(analysis.predictions.logits), K), np.float64)
    rows = {s.z: s.row for s in analysis.batch.slices if s.included}
    for r in analysis.slice_table():
        if r["included"] and "probabilities" in r:
            out[rows[r["z"]]] = [r["probabilities"][l] for l in analysis.predictions.labels]
    return out


def verdict_text(vd) -> str:
    """'MALIGNANT (uncertain) P = 0.55', or 'NOT ASSESSABLE (input unlike ...)'."""
    if not vd.assessable:
        return f"{vd.label.upper()} ({vd.reason})"
    return (f"{vd.label.upper()}{' (uncertain)' if vd.uncertain else ''} "
            f"P = {vd.probabilities.get(vd.label, 0.0):.2f}")


def slice_view(analysis: Analysis, row: int, label: str | None = None) -> SliceView:
    """The CT and CAM of the model slice in prediction row ``row`` on the source grid."""
    import SimpleITK as sitk

    from dicompipe.preprocess import window

    label = label or analysis.verdict.evidence
    ms = next(s for s in analysis.batch.slices if s.row == row)
    vz = ms.volume_z[len(ms.volume_z) // 2] if ms.volume_z else 0
    vol = analysis.volume
    hu = np.asarray(vol.array[vz], np.float32)
    if vol.windowed:
        ct = np.clip(hu / 255.0, 0, 1)
    else:
        ct = window(hu, *display_window(analysis))
    cam = None
    from dicompipe.explain import cam_volume
    cv = cam_volume(analysis.cams, analysis.batch, label)
    if cv is not None:
        top = float(analysis.cams.scale.get(label) or 0.0)
        arr = np.asarray(sitk.GetArrayViewFromImage(cv)[vz], np.float32)
        cam = np.clip(arr / top, 0, 1) if top > 0 else np.zeros_like(arr)
    sx, sy, _ = vol.image.GetSpacing()
    z_mm = float(vol.image.TransformIndexToPhysicalPoint((0, 0, int(vz)))[2])
    src = vol.slices[vz][0] if vz < len(vol.slices) and vol.slices[vz] else None
    prob = None
    cal = calibrated(analysis)
    if label in analysis.predictions.labels and row < len(cal):
        prob = float(cal[row, analysis.predictions.labels.index(label)])
    return SliceView(ct=ct, cam=cam, pixel_mm=(sy, sx), edges=_edges(vol.image), volume_z=vz,
                     z_mm=z_mm, instance_number=src.instance_number if src else None,
                     sop_instance_uid=src.sop_instance_uid if src else None, probability=prob)


def _draw_slice(ax, v: SliceView, *, letters: bool = True, fontsize: float = 9,
                bottom_letter: bool = True) -> bool:
    """CT + CAM overlay + hot outline on ``ax``. Returns True when a hot region was outlined."""
    aspect = v.pixel_mm[0] / v.pixel_mm[1]
    ax.imshow(v.ct, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="antialiased")
    hot = False
    if v.cam is not None:
        ax.imshow(np.ma.masked_less(v.cam, SHOW_BELOW), cmap=CAM_CMAP, vmin=0, vmax=1, alpha=0.45,
                  aspect=aspect, interpolation="bilinear")
        if float(v.cam.max()) >= HOT:
            ax.contour(v.cam, levels=[HOT], colors="white", linewidths=1.3)
            hot = True
    ax.set_xticks([])
    ax.set_yticks([])
    if letters:
        kw = dict(transform=ax.transAxes, fontsize=fontsize, fontweight="bold", color="black")
        ax.text(-0.015, 0.5, v.edges["left"], ha="right", va="center", **kw)
        ax.text(1.015, 0.5, v.edges["right"], ha="left", va="center", **kw)
        ax.text(0.5, 1.01, v.edges["top"], ha="center", va="bottom", **kw)
        if bottom_letter:
            ax.text(0.5, -0.01, v.edges["bottom"], ha="center", va="top", **kw)
    return hot


def _colourbar(fig, cax, label: str, scale: float):
    cb = fig.colorbar(ScalarMappable(Normalize(0, 1), CAM_CMAP), cax=cax)
    cb.set_label(f"Grad-CAM '{label}' / volume max ({scale:.3g})", fontsize=8)
    cb.ax.axhline(HOT, color="white", lw=2)
    cb.ax.axhline(HOT, color="black", lw=0.6)
    cb.ax.tick_params(labelsize=7)
    return cb


# --------------------------------------------------------------------------- figures
def _window_text(analysis: Analysis) -> str:
    if analysis.volume.windowed:
        return "8-bit windowed input (not HU)"
    lvl, wid = display_window(analysis)
    return f"window L {lvl:g} / W {wid:g} HU"


def slice_figure(analysis: Analysis, row: int, label: str | None = None, *,
                 title: str | None = None) -> Figure:
    """One analysed slice: the windowed CT alone and with the CAM overlay (colour bar, hot
    outline), and a legend panel below (class, probabilities, slice, instance number).

    Example::

        >>> fig = slice_figure(analysis, row=3, label="malignant")
    """
    label = label or analysis.verdict.evidence
    v = slice_view(analysis, row, label)
    fig = Figure(figsize=(11.0, 7.0), dpi=DPI)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 3, height_ratios=[5.0, 1.2], width_ratios=[24, 24, 1],
                          left=0.03, right=0.93, top=0.9, bottom=0.02, hspace=0.1, wspace=0.14)
    ax_ct = fig.add_subplot(gs[0, 0])
    _draw_slice(ax_ct, dataclasses.replace(v, cam=None))
    ax_ct.set_title(f"CT ({_window_text(analysis)})", fontsize=9, pad=14)
    ax = fig.add_subplot(gs[0, 1])
    hot = _draw_slice(ax, v)
    ax.set_title(f"CT + Grad-CAM for '{label}'" if v.cam is not None else "no Grad-CAM",
                 fontsize=9, pad=14)
    fig.suptitle(title or f"Grad-CAM for '{label}'", fontsize=12, fontweight="bold", y=0.985)
    if v.cam is not None:
        _colourbar(fig, fig.add_subplot(gs[0, 2]), label, analysis.cams.scale[label])
    tax = fig.add_subplot(gs[1, :])
    tax.axis("off")
    vd = analysis.verdict
    left = [
        # the not-assessable reason is long: its own line keeps clear of the right column
        f"Verdict: {verdict_text(vd) if vd.assessable else vd.label.upper()}",
        "         (calibrated, whole volume)" if vd.assessable else
        "         (unlike training data; P is no verdict)",
        f"This slice: P({label}) = {v.probability:.2f} (calibrated)" if v.probability is not None
        else "This slice: no probability",
        f"Model {analysis.model.get('name', '?')} {analysis.model.get('version', '')}".rstrip(),
    ]
    right = [
        f"InstanceNumber {v.instance_number if v.instance_number is not None else '-'}   "
        f"z index {v.volume_z} (0..{analysis.volume.shape[0] - 1})   z = {v.z_mm:.1f} mm",
        f"SOPInstanceUID {v.sop_instance_uid or '-'}",
    ]
    if v.cam is None:
        right.append("No Grad-CAM for this analysis (run without --no-cam to get one).")
    else:
        right.append("Colour: Grad-CAM as a fraction of its maximum over the whole volume")
        right.append("White outline: hot region (>= 50 % of that maximum)" if hot else
                     "No region reaches 50 % of the volume maximum here (no outline)")
    kw = dict(va="top", fontsize=8.5, family="monospace", transform=tax.transAxes,
              linespacing=1.4)
    tax.text(0.0, 1.0, "\n".join(left), ha="left", **kw)
    tax.text(0.43, 1.0, "\n".join(right), ha="left", **kw)
    tax.text(0.0, 0.12, RESEARCH_USE, ha="left", va="top", fontsize=8.5, color="#b00000",
             fontweight="bold", transform=tax.transAxes)
    return fig


def key_slice_figure(analysis: Analysis, key: KeySlice, label: str | None = None) -> Figure:
    """:func:`slice_figure` for one of ``analysis.verdict.key_slices``, titled with its rank."""
    keys = analysis.verdict.key_slices
    rank = next((i for i, k in enumerate(keys) if k.row == key.row), 0) + 1
    label = label or analysis.verdict.evidence
    return slice_figure(analysis, key.row, label,
                        title=f"Key slice {rank} of {len(keys)} - Grad-CAM for '{label}'")


def montage_figure(analysis: Analysis, label: str | None = None, *, ncols: int = 3) -> Figure:
    """All key slices side by side with the same CAM scale and one colour bar."""
    label = label or analysis.verdict.evidence
    keys = analysis.verdict.key_slices
    n = max(1, len(keys))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    height = 2.9 * nrows + 0.9
    fig = Figure(figsize=(3.0 * ncols + 1.2, height), dpi=DPI)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(nrows, ncols + 1, width_ratios=[12] * ncols + [0.6],
                          left=0.04, right=0.9, top=1 - 0.5 / height,
                          bottom=0.45 / height, hspace=0.25, wspace=0.12)
    vd = analysis.verdict
    fig.suptitle(f"Key slices (evidence for {vd.evidence}) - {verdict_text(vd)}; "
                 f"Grad-CAM for '{label}'",
                 fontsize=11, fontweight="bold")
    has_cam = False
    for i, k in enumerate(keys):
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        v = slice_view(analysis, k.row, label)
        _draw_slice(ax, v, letters=i == 0, fontsize=7, bottom_letter=False)
        has_cam |= v.cam is not None
        inst = f"IN {v.instance_number}" if v.instance_number is not None else f"z {v.volume_z + 1}"
        p = f"P={v.probability:.2f}" if v.probability is not None else ""
        ax.set_xlabel(f"#{i + 1}  {inst}  {p}  ({v.z_mm:.1f} mm)", fontsize=8)
    if not keys:
        ax = fig.add_subplot(gs[0, 0])
        ax.axis("off")
        ax.text(0.5, 0.5, "no key slices", ha="center", va="center")
    if has_cam:
        _colourbar(fig, fig.add_subplot(gs[:, ncols]), label, analysis.cams.scale[label])
    fig.text(0.04, 0.1 / height, "IN = InstanceNumber. White outline: CAM >= 50 % of the "
             "volume maximum.  " + RESEARCH_USE, fontsize=7, color="#b00000")
    return fig


def slice_scores_figure(analysis: Analysis) -> Figure:
    """Calibrated per-slice class probabilities along z; key slices and skipped slices marked."""
    labels = analysis.predictions.labels
    cal = calibrated(analysis)
    slices = analysis.batch.slices
    fig = Figure(figsize=(9.0, 4.6), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0.08, 0.17, 0.66, 0.70])
    inc = [s for s in slices if s.included]
    xs = np.array([s.z for s in inc])
    for i, l in enumerate(labels):
        if len(inc):
            ax.plot(xs, cal[[s.row for s in inc], i], marker="o", ms=3.5, lw=1.5,
                    color=class_colour(l, i), label=f"P({l})")
    for s in slices:
        if not s.included:
            ax.axvspan(s.z - 0.5, s.z + 0.5, color="0.85", lw=0, zorder=0)
    vd = analysis.verdict
    for rank, k in enumerate(vd.key_slices, 1):
        ax.axvline(k.z, color="black", ls="--", lw=0.8, zorder=1)
        inst = k.instance_numbers[0] if k.instance_numbers else None
        ax.text(k.z, 1.02, f"#{rank}" + (f"\nIN {inst}" if inst is not None else ""),
                ha="center", va="bottom", fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_ylim(0, 1)
    if slices:
        ax.set_xlim(min(s.z for s in slices) - 0.5, max(s.z for s in slices) + 0.5)
    d = np.asarray(analysis.batch.grid.GetDirection(), float).reshape(3, 3)[:, 2]
    towards = {"S": "superior", "I": "inferior", "L": "left", "R": "right", "A": "anterior",
               "P": "posterior"}[_letter(d)]
    ax.set_xlabel(f"model slice index (grid z, increasing towards {towards})", fontsize=9)
    ax.set_ylabel("calibrated probability", fontsize=9)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if any(not s.included for s in slices):
        handles.append(Patch(color="0.85", label="skipped slice"))
        names.append("skipped slice (not analysed)")
    handles.append(ax.plot([], [], color="black", ls="--", lw=0.8)[0])
    names.append("key slice\n(#rank, IN = InstanceNumber)")
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
              frameon=False)
    fig.suptitle(f"Per-slice probabilities (temperature {vd.temperature:.2f}); verdict "
                 f"{verdict_text(vd)}",
                 fontsize=11, fontweight="bold", x=0.08, ha="left", y=0.985)
    fig.text(0.08, 0.015, RESEARCH_USE, fontsize=7, color="#b00000")
    return fig


def probability_figure(analysis: Analysis) -> Figure:
    """Volume-level calibrated probability per class, with the uncertain band shaded."""
    vd = analysis.verdict
    labels = list(vd.probabilities)
    fig = Figure(figsize=(7.0, 1.4 + 0.55 * len(labels)), dpi=DPI)
    FigureCanvasAgg(fig)
    h = fig.get_figheight()
    ax = fig.add_axes([0.15, 0.75 / h, 0.62, 1 - 1.25 / h])
    lo, hi = vd.uncertain_band
    ax.axvspan(lo, hi, color="#ffd966", alpha=0.5, lw=0, label="uncertain band")
    ys = np.arange(len(labels))[::-1]
    for y, (i, l) in zip(ys, enumerate(labels)):
        p = vd.probabilities[l]
        ax.barh(y, p, color=class_colour(l, i), height=0.6,
                edgecolor="black" if l == vd.class_label else "none", lw=1.2)
        ax.text(min(p + 0.01, 0.9), y, f"{p:.2f}", va="center", fontsize=9)
    ax.set_yticks(ys, labels, fontsize=9)
    for t in ax.get_yticklabels():
        if t.get_text() == vd.class_label:
            t.set_fontweight("bold")
    ax.set_xlim(0, 1)
    ax.set_xlabel("calibrated probability (volume)", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
              title=f"top P in [{lo:.2f}, {hi:.2f}]", title_fontsize=7)
    fig.suptitle(f"Verdict: {verdict_text(vd)}  -  "
                 f"{vd.rule}, T = {vd.temperature:.2f}, {vd.n_slices} slices",
                 fontsize=10, fontweight="bold", x=0.02, ha="left", y=1 - 0.1 / h)
    fig.text(0.02, 0.06 / h * 4, RESEARCH_USE, fontsize=7, color="#b00000")
    return fig


# --------------------------------------------------------------------------- output
def save(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return path


def save_rgb(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array (e.g. from :func:`to_rgb`) as PNG atomically; returns ``path``."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG", dpi=(DPI, DPI))
    return path


def to_rgb(fig: Figure, dpi: int = DPI) -> np.ndarray:
    """Render ``fig`` to a (rows, columns, 3) uint8 RGB array."""
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
