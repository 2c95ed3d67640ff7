"""The report figures and the web app's viewer helpers as a reader sees them: integer slice
ticks, key-slice labels that never overlap, a visible line for every class, a plain CT beside
each overlay in the montage, one CAM colour function for report and app, a soft overlay edge,
orientation letters from the direction cosines, no "None" in the series table, and the
README's Python example naming functions that exist. Fast: hand-built analyses, no model."""
from __future__ import annotations

import importlib
import inspect
import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from analysis_factory import make_analysis

import dicompipe
from dicompipe import pipeline, report


class _Figures:
    """``dicompipe.report.figures`` imported on first use: matplotlib stays out of collection."""

    def __getattr__(self, name):
        return getattr(importlib.import_module("dicompipe.report.figures"), name)


figures = _Figures()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def twenty():
    """20 slices, five adjacent key slices (the case that used to overlap)."""
    return make_analysis(n_z=20, size=48, lesion_z=(8, 9, 10, 11, 12), k=5, skip=(0, 19))


def _drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_slice_scores_ticks_are_integers_and_every_class_visible(twenty):
    fig = figures.slice_scores_figure(twenty)
    _drawn(fig)
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_ylim() == pytest.approx((-0.02, 1.05))     # P = 0 and P = 1 off the frame
    lines = [l for l in ax.get_lines() if str(l.get_label()).startswith("P(")]
    assert [l.get_label() for l in lines] == [f"P({c})" for c in twenty.predictions.labels]
    styles = {(l.get_linestyle(), l.get_marker()) for l in lines}
    assert len(styles) == len(lines)                         # told apart where they coincide
    widths = [l.get_linewidth() for l in lines]
    assert widths == sorted(widths, reverse=True)            # thinner ones drawn on top
    assert "counted from 0" in ax.get_xlabel()


def _key_labels(fig):
    return [t for t in fig.axes[0].texts if t.get_gid() == "key-label"]


@pytest.mark.parametrize("n_keys", [5, 14])
def test_key_slice_labels_never_overlap_and_all_are_listed(n_keys):
    a = make_analysis(n_z=40, size=32, lesion_z=tuple(range(10, 10 + n_keys)), k=n_keys,
                      skip=())
    fig = figures.slice_scores_figure(a)
    renderer = _drawn(fig)
    labels = _key_labels(fig)
    assert labels, "no key-slice label drawn"
    boxes = [t.get_window_extent(renderer) for t in labels]
    for b1, b2 in itertools.combinations(boxes, 2):
        assert not b1.overlaps(b2), (b1, b2)
    listing = next(t for t in fig.axes[0].texts if t.get_gid() == "key-list").get_text()
    for r in range(1, min(n_keys, 11) + 1):                  # every key slice is named beside
        assert re.search(rf"#{r}\s+z {a.verdict.key_slices[r - 1].z}\b", listing)


@pytest.mark.parametrize("ncols", [5, 2])
def test_montage_pairs_plain_ct_with_overlay(twenty, ncols):
    from dicompipe.report import slice_images
    rgb, lay = slice_images.montage(twenty, ncols=ncols)
    n = len(twenty.verdict.key_slices)
    assert rgb.shape[:2] == (lay.height, lay.width) and len(lay.ct) == len(lay.cam) == n

    def colour(box):                      # pixels whose channels differ: the CAM overlay
        x, y, w, h = box
        return int((np.ptp(rgb[y:y + h, x:x + w].astype(int), axis=2) > 30).sum())

    assert all(colour(b) == 0 for b in lay.ct)               # one plain CT per key slice ...
    assert all(colour(b) > 100 for b in lay.cam)             # ... above its overlay
    assert all(c[1] > t[1] for t, c in zip(lay.ct, lay.cam))
    assert len({b[1] for b in lay.ct}) == -(-n // ncols)     # wrapped into rows of ncols


def test_overlay_fades_in_smoothly():
    m = np.linspace(0, 1, 1001)
    a = figures.cam_alpha(m, 0.5)
    assert a[m <= figures.CAM_FLOOR].max() == 0 and a[-1] == pytest.approx(0.5)
    assert np.all(np.diff(a) >= 0) and np.abs(np.diff(a)).max() < 0.005   # no step
    rgba = figures.cam_rgba(m)
    assert rgba.shape == (1001, 4) and rgba[..., 3].max() == pytest.approx(figures.CAM_OPACITY)


def test_display_cam_has_no_hard_edges(twenty):
    """Where the overlay fades in (below 60 % of the maximum) the smoothed map changes by
    less per pixel than the raw, linear-between-cells one; the peak keeps its value."""
    from dicompipe.ui import services

    label = twenty.verdict.evidence
    k = twenty.verdict.key_slices[0]
    raw = services.cam_slice(twenty, label, k.volume_z[0]) / twenty.cams.scale[label]
    shown = figures.display_cam(twenty, label, k.volume_z[0])
    assert shown.shape == raw.shape and 0 <= shown.min() and shown.max() <= 1
    fade = (raw < figures.CAM_FULL)[1:, 1:]

    def step(x):
        return max(np.abs(np.diff(x, axis=0))[:, 1:][fade].max(),
                   np.abs(np.diff(x, axis=1))[1:, :][fade].max())

    assert step(shown) < step(raw)
    assert shown.max() == pytest.approx(raw.max(), rel=1e-4)    # the colour scale still holds
    assert figures.slice_view(twenty, k.row).cam == pytest.approx(shown)


def test_edge_letters_follow_the_direction_cosines():
    assert figures.edge_letters(np.eye(3)) == {"left": "R", "right": "L", "top": "A",
                                               "bottom": "P"}
    flipped = np.diag([-1.0, -1.0, 1.0])                     # x towards R, y towards A
    assert figures.edge_letters(flipped) == {"left": "L", "right": "R", "top": "P",
                                             "bottom": "A"}
    coronal = np.array([[1, 0, 0], [0, 0, -1], [0, -1, 0]], float)   # columns: x, y, z axes
    assert figures.edge_letters(coronal.ravel()) == {"left": "R", "right": "L", "top": "S",
                                                     "bottom": "I"}


def test_viewer_letters_and_colours_come_from_the_report():
    pytest.importorskip("streamlit")
    from dicompipe.ui import views

    a = make_analysis(n_z=6, size=48)
    a.volume.image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))          # mirrored left-right
    edges = views.orientation(a)
    assert (edges["left"], edges["right"], edges["top"]) == ("L", "R", "A")
    hu = a.volume.array[3]
    cam = figures.display_cam(a, a.verdict.evidence, 3)
    plain = views.slice_rgb(hu, (-600, 1500), cam, 0.5, min_side=1)
    assert np.array_equal(plain, figures.blend(views.gray(hu, (-600, 1500)), cam, 0.5))
    assert not hasattr(views, "cam_rgba") and not hasattr(views, "CMAP")   # no second map
    big = views.slice_rgb(hu, (-600, 1500), cam, 0.5, min_side=256)
    lettered = views.slice_rgb(hu, (-600, 1500), cam, 0.5, min_side=256, edges=edges)
    diff = np.any(lettered != big, axis=2)
    h, w = diff.shape
    assert diff[h // 3: 2 * h // 3, : w // 8].any() and diff[h // 3: 2 * h // 3, -w // 8:].any()
    assert diff[: h // 8, w // 3: 2 * w // 3].any()
    assert not diff[h // 4: 3 * h // 4, w // 4: 3 * w // 4].any()   # none on the anatomy


def test_series_table_shows_no_none():
    pytest.importorskip("streamlit")
    import dataclasses

    from dicompipe.ui import views

    a = make_analysis(n_z=4, size=16)
    bare = dataclasses.replace(a.series, key="s2", series_number=None, slice_thickness=None,
                               series_description=None, orientation=None, patient_name=None)
    rows = views.series_rows([a.series, bare], a.series, include_phi=True)
    assert all(v is not None and v != "None" for r in rows for v in r.values()), rows
    assert rows[1]["series"] == "—" and rows[1]["thickness mm"] == "—"
    assert rows[0]["thickness mm"] == "2.5" and rows[0]["chosen"] == "●"


def test_readme_python_report_example_names_exist():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "report.write" in b)
    assert "dicompipe.run_case(" in block and "report.write(" in block
    assert callable(dicompipe.run_case) and callable(dicompipe.analyze)
    for fn, used in ((pipeline.run_case, ("organ", "out", "formats", "history")),
                     (report.write, ("formats",))):
        assert set(used) <= set(inspect.signature(fn).parameters), fn
    for path in re.findall(r'"(examples/[^"]+)"', block):
        assert (ROOT / path).is_dir(), path
