"""Annotated slice images (key slices, montage) drawn straight into pixels with Pillow.

The same content as a matplotlib figure (CT alone and with the Grad-CAM overlay, hot
outline, orientation letters, colour bar, legend) for a fraction of the time: a key slice
takes ~30 ms here against ~330 ms as a figure, which made the PNGs most of a report's
writing time. Colours, opacity, display smoothing and the volume-wide CAM scale are those
of :mod:`dicompipe.report.figures` (``slice_view``, ``blend``), so the report, the DICOM
Secondary Capture and the web app agree. Every builder returns an RGB uint8 array
(rows, columns, 3); :func:`dicompipe.report.figures.save_rgb` writes one.

Example::

    >>> from dicompipe.report import figures, slice_images
    >>> rgb = slice_images.key_slice_image(analysis, analysis.verdict.key_slices[0])
    >>> figures.save_rgb(rgb, "out/key_01.png")
"""
from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicompipe.report.figures import (
    HOT,
    SliceView,
    blend,
    cam_alpha,
    cam_colours,
    display_window,
    slice_view,
    verdict_text,
)
from dicompipe.types import RESEARCH_USE, Analysis, KeySlice

WHITE, BLACK, RED = (255, 255, 255), (0, 0, 0), (176, 0, 0)


@cache
def font(size: int, bold: bool = False, mono: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu (shipped with matplotlib, so with every installation) at ``size`` pixels."""
    import matplotlib

    name = "DejaVuSans" + ("Mono" if mono else "") + ("-Bold" if bold else "") + ".ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def wrap(text: str, f: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels in font ``f`` (breaks at spaces)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and f.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def panel(v: SliceView, box: tuple[int, int], *, cam: bool = True) -> tuple[np.ndarray, bool]:
    """The slice fitted into ``box`` (width, height) pixels at its physical aspect ratio:
    the CT in grey, with ``cam`` the Grad-CAM overlay and a white outline of the hot
    region (CAM >= ``HOT`` of the volume maximum). Returns (RGB array, outline drawn)."""
    from scipy.ndimage import binary_dilation, binary_erosion

    rows, cols = v.ct.shape
    h_mm, w_mm = rows * v.pixel_mm[0], cols * v.pixel_mm[1]
    s = min(box[0] / w_mm, box[1] / h_mm)
    size = (max(1, round(w_mm * s)), max(1, round(h_mm * s)))
    grey = Image.fromarray(np.rint(np.clip(v.ct, 0, 1) * 255).astype(np.uint8))
    # Lanczos when shrinking (no aliasing), bilinear when enlarging (no ringing at edges)
    shrink = Image.Resampling.LANCZOS if size[0] <= cols else Image.Resampling.BILINEAR
    grey = np.asarray(grey.resize(size, shrink))
    if not cam or v.cam is None:
        return np.repeat(grey[..., None], 3, axis=2), False
    m = np.asarray(Image.fromarray(np.asarray(v.cam, np.float32)).resize(size, Image.Resampling.BILINEAR))
    rgb = blend(grey, np.clip(m, 0, 1))
    hot = m >= HOT
    if not hot.any():
        return rgb, False
    # border_value=1: no outline along the image's own edge, where the region is cut off
    rgb[binary_dilation(hot) & ~binary_erosion(hot, border_value=1)] = WHITE
    return rgb, True


def colour_bar(height: int, label: str, scale: float) -> np.ndarray:
    """The CAM colour bar (the overlay colours at full opacity on mid-grey, 0 at the
    bottom), ticks 0 ... 1, a line at ``HOT`` and the rotated label, as an RGB block."""
    bar_w, width = 18, 70
    img = Image.new("RGB", (width, height + 14), WHITE)
    m = np.linspace(1, 0, height)
    a = cam_alpha(m, 1.0)[:, None]
    colours = np.rint(((1 - a) * 0.5 + a * cam_colours(m)) * 255).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(colours[:, None], bar_w, axis=1)), (0, 7))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 7, bar_w - 1, height + 6), outline=BLACK)
    y_hot = 7 + round((1 - HOT) * (height - 1))
    d.line((0, y_hot, bar_w - 1, y_hot), fill=WHITE, width=3)
    d.line((0, y_hot, bar_w - 1, y_hot), fill=BLACK, width=1)
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = 7 + round((1 - t) * (height - 1))
        d.line((bar_w, y, bar_w + 3, y), fill=BLACK)
        d.text((bar_w + 6, y), f"{t:.1f}", font=font(10), fill=BLACK, anchor="lm")
    text = f"Grad-CAM '{label}' / volume max ({scale:.3g})"
    f = font(11)
    side = Image.new("RGB", (height + 14, 16), WHITE)
    ImageDraw.Draw(side).text(((height + 14) // 2, 8), text, font=f, fill=BLACK, anchor="mm")
    img.paste(side.rotate(90, expand=True), (width - 17, 0))
    return np.asarray(img)


def _letters(d: ImageDraw.ImageDraw, edges: dict[str, str], x: int, y: int, w: int, h: int,
             size: int = 13, bottom: bool = True) -> None:
    f = font(size, bold=True)
    d.text((x - 5, y + h // 2), edges["left"], font=f, fill=BLACK, anchor="rm")
    d.text((x + w + 5, y + h // 2), edges["right"], font=f, fill=BLACK, anchor="lm")
    d.text((x + w // 2, y - 2), edges["top"], font=f, fill=BLACK, anchor="mb")
    if bottom:
        d.text((x + w // 2, y + h + 2), edges["bottom"], font=f, fill=BLACK, anchor="mt")


def _paste(img: Image.Image, rgb: np.ndarray, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Paste ``rgb`` centred in ``box`` (x, y, w, h) with a thin black frame; its own box."""
    h, w = rgb.shape[:2]
    x, y = box[0] + (box[2] - w) // 2, box[1] + (box[3] - h) // 2
    img.paste(Image.fromarray(rgb), (x, y))
    ImageDraw.Draw(img).rectangle((x - 1, y - 1, x + w, y + h), outline=BLACK)
    return x, y, w, h


def _window_text(analysis: Analysis) -> str:
    if analysis.volume.windowed:
        return "8-bit windowed input (not HU)"
    lvl, wid = display_window(analysis)
    return f"window L {lvl:g} / W {wid:g} HU"


def slice_image(analysis: Analysis, row: int, label: str | None = None, *,
                title: str | None = None, note: str | None = None) -> np.ndarray:
    """One analysed slice: the windowed CT alone and with the CAM overlay (colour bar, hot
    outline), and a legend below (class, probabilities, slice, instance number, ``note``).

    >>> rgb = slice_image(analysis, row=3, label="malignant")
    """
    label = label or analysis.verdict.evidence
    v = slice_view(analysis, row, label)
    W, H, side = 1210, 770, 490
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    d.text((W // 2, 14), title or f"Grad-CAM for '{label}'", font=font(17, bold=True),
           fill=BLACK, anchor="mt")
    ct_rgb, _ = panel(v, (side, side), cam=False)
    over_rgb, hot = panel(v, (side, side))
    for x0, rgb, sub in ((40, ct_rgb, f"CT ({_window_text(analysis)})"),
                         (575, over_rgb, f"CT + Grad-CAM for '{label}'" if v.cam is not None
                          else "no Grad-CAM")):
        box = _paste(img, rgb, (x0, 92, side, side))
        d.text((x0 + side // 2, 58), sub, font=font(13), fill=BLACK, anchor="mt")
        _letters(d, v.edges, *box)
    if v.cam is not None:
        img.paste(Image.fromarray(colour_bar(side, label, analysis.cams.scale[label])), (1105, 85))
    vd = analysis.verdict
    left = [
        f"Verdict: {verdict_text(vd) if vd.assessable else vd.label.upper()}",
        "         (calibrated, whole volume)" if vd.assessable else
        "         (unlike training data; P is no verdict)",
        f"This slice: P({label}) = {v.probability:.2f} (calibrated)" if v.probability is not None
        else "This slice: no probability",
        f"Model {analysis.model.get('name', '?')} {analysis.model.get('version', '')}".rstrip(),
    ] + ([note] if note else [])
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
    mono = font(12, mono=True)
    for x, lines in ((40, left), (505, right)):
        for i, line in enumerate(lines):
            d.text((x, 628 + 18 * i), line, font=mono, fill=BLACK)
    d.text((40, 738), RESEARCH_USE, font=font(13, bold=True), fill=RED)
    return np.asarray(img)


def rank_note(verdict, key: KeySlice) -> str:
    """What ranked a key slice, for its image's legend.

    >>> rank_note(verdict, key)
    'Ranked by its Grad-CAM in the lung fields (97 % of it there)'
    """
    share = f" ({100 * key.in_region:.0f} % of it there)" if verdict.region and key.in_region is not None else ""
    return f"Ranked by {verdict.ranked_by}{share}"


def key_slice_image(analysis: Analysis, key: KeySlice, label: str | None = None) -> np.ndarray:
    """:func:`slice_image` for one of ``analysis.verdict.key_slices``, titled with its rank;
    the legend says what ranked it."""
    keys = analysis.verdict.key_slices
    rank = next((i for i, k in enumerate(keys) if k.row == key.row), 0) + 1
    label = label or analysis.verdict.evidence
    return slice_image(analysis, key.row, label,
                       title=f"Key slice {rank} of {len(keys)} - Grad-CAM for '{label}'",
                       note=rank_note(analysis.verdict, key))


@dataclasses.dataclass(frozen=True)
class MontageLayout:
    """Pixel positions of a montage: for key slice i, ``ct[i]`` and ``cam[i]`` are the
    (x, y, w, h) boxes of its plain CT tile and of its overlay tile below it."""

    width: int
    height: int
    ct: list[tuple[int, int, int, int]]
    cam: list[tuple[int, int, int, int]]


def montage_layout(n: int, ncols: int = 5, *, tile: int = 250, top: int = 70,
                   bottom: int = 40) -> MontageLayout:
    """Where the tiles of a montage of ``n`` key slices go (rows of ``ncols`` pairs)."""
    ncols = max(1, min(ncols, n))
    gap, left, right, caption = 14, 70, 110, 26
    width = max(left + ncols * (tile + gap) + right, 760)
    x0 = (width - (ncols * (tile + gap) - gap)) // 2 - (right - left) // 2
    blocks = max(1, -(-n // ncols))
    block_h = 2 * tile + gap + caption
    ct, cam = [], []
    for i in range(n):
        blk, col = divmod(i, ncols)
        x, y = x0 + col * (tile + gap), top + blk * (block_h + gap)
        ct.append((x, y, tile, tile))
        cam.append((x, y + tile + gap, tile, tile))
    return MontageLayout(width, top + blocks * (block_h + gap) + bottom, ct, cam)


def montage_image(analysis: Analysis, label: str | None = None, *, ncols: int = 5) -> np.ndarray:
    """All key slices with the same CAM scale and one colour bar: for each key slice the
    plain CT (top row, for orientation) above the same slice with the Grad-CAM overlay;
    more than ``ncols`` key slices wrap into further pairs of rows."""
    return montage(analysis, label, ncols=ncols)[0]


def montage(analysis: Analysis, label: str | None = None, *,
            ncols: int = 5) -> tuple[np.ndarray, MontageLayout]:
    """:func:`montage_image` and where its tiles are."""
    label = label or analysis.verdict.evidence
    keys = analysis.verdict.key_slices
    vd = analysis.verdict
    width = montage_layout(max(1, len(keys)), ncols).width
    ft, fs, ff = font(15, bold=True), font(12), font(10)
    title = wrap(f"Key slices (evidence for {vd.evidence}): CT above, CT + Grad-CAM for "
                 f"'{label}' below", ft, width - 40)
    sub = wrap(f"Verdict: {verdict_text(vd)}", fs, width - 40)
    foot = wrap("z = slice index from 0.  IN = InstanceNumber.  White outline: CAM >= 50 % "
                "of the volume maximum.  " + RESEARCH_USE, ff, width - 40)
    top = 14 + 20 * len(title) + 16 * len(sub) + 24
    lay = montage_layout(max(1, len(keys)), ncols, top=top, bottom=14 + 14 * len(foot))
    img = Image.new("RGB", (lay.width, lay.height), WHITE)
    d = ImageDraw.Draw(img)
    y = 12
    for line in title:
        d.text((lay.width // 2, y), line, font=ft, fill=BLACK, anchor="mt")
        y += 20
    for line in sub:
        d.text((lay.width // 2, y), line, font=fs, fill=BLACK, anchor="mt")
        y += 16
    has_cam = False
    for i, k in enumerate(keys):
        v = slice_view(analysis, k.row, label)
        ct_box = _paste(img, panel(v, lay.ct[i][2:], cam=False)[0], lay.ct[i])
        cam_box = _paste(img, panel(v, lay.cam[i][2:])[0], lay.cam[i])
        if i % ncols == 0:
            _letters(d, v.edges, *ct_box, size=11, bottom=False)
            for text, (x, y0, _, h) in (("CT", lay.ct[i]), ("CT + Grad-CAM", lay.cam[i])):
                _rotated(img, text, fs, (x - 34, y0 + h // 2))
        has_cam |= v.cam is not None
        inst = f"IN {v.instance_number}  " if v.instance_number is not None else ""
        p = f"P={v.probability:.2f}  " if v.probability is not None else ""
        d.text((cam_box[0] + cam_box[2] // 2, cam_box[1] + cam_box[3] + 6),
               f"#{i + 1}  z {v.volume_z}  {inst}{p}({v.z_mm:.1f} mm)", font=font(11),
               fill=BLACK, anchor="mt")
    if not keys:
        x, y0, w, h = lay.ct[0]
        d.text((x + w // 2, y0 + h), "no key slices", font=fs, fill=BLACK, anchor="mm")
    if has_cam:                                  # beside the first row of overlays
        x, y0, w, h = lay.cam[min(ncols, len(keys)) - 1]
        img.paste(Image.fromarray(colour_bar(h - 14, label, analysis.cams.scale[label])),
                  (x + w + 14, y0))
    y = lay.height - 8 - 14 * len(foot)
    for line in foot:
        d.text((16, y), line, font=ff, fill=RED)
        y += 14
    return np.asarray(img), lay


def _rotated(img: Image.Image, text: str, f: ImageFont.FreeTypeFont, centre: tuple[int, int]) -> None:
    """Draw ``text`` turned 90 degrees (reading upwards) centred at ``centre``."""
    w = int(f.getlength(text)) + 4
    strip = Image.new("RGB", (w, f.size + 6), WHITE)
    ImageDraw.Draw(strip).text((w // 2, (f.size + 6) // 2), text, font=f, fill=BLACK, anchor="mm")
    strip = strip.rotate(90, expand=True)
    img.paste(strip, (centre[0] - strip.width // 2, centre[1] - strip.height // 2))
