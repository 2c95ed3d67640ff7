"""The app's only door into the library: thin wrappers over public stage functions.

Nothing here computes a result: a case goes through :func:`dicompipe.pipeline.run_case`
(analysis, reports, history, one failure policy); the rest calls :mod:`dicompipe.io`,
:mod:`dicompipe.model` and reads :mod:`dicompipe.history`, and adapts outputs for display.
Tests replace these functions (or the stages behind run_case) to drive the app without a model.

Environment (optional):

- ``DICOMPIPE_UI_OUT``: folder for report folders (default: ``<user data dir>/ui-runs``),
  kept so that the case history can open a past report.
- ``DICOMPIPE_UI_MODEL``: a bundle folder to use instead of the organ's built-in bundle.
- ``DICOMPIPE_UI_ALLOW_UNTRAINED=1``: accept an untrained bundle (demos and tests only; the
  app then says so on every verdict).
- ``DICOMPIPE_HISTORY``: the case-history database (as for the CLI).
"""
from __future__ import annotations

import datetime as _dt
import io as _io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicompipe import io, organs
from dicompipe.types import Analysis, CaseResult, SeriesInfo


# --------------------------------------------------------------------------- settings
def model_override() -> str | None:
    return os.environ.get("DICOMPIPE_UI_MODEL") or None


#: the inference backend of every analysis (``dicompipe ui --backend``); unset: "auto"
BACKEND_ENV = "DICOMPIPE_UI_BACKEND"


def backend_override() -> str:
    return os.environ.get(BACKEND_ENV) or "auto"


def allow_untrained() -> bool:
    return os.environ.get("DICOMPIPE_UI_ALLOW_UNTRAINED", "").lower() in ("1", "true", "yes")


def data_dir() -> Path:
    """The user data directory dicompipe uses (the history stage's)."""
    from dicompipe import history
    return Path(history.user_data_dir())


def reports_root() -> Path:
    return Path(os.environ.get("DICOMPIPE_UI_OUT") or data_dir() / "ui-runs").expanduser()


def user_reports_root(user: str | None = None) -> Path:
    """Where ``user``'s run folders go: ``reports_root()/users/<user>`` (the root without one).

    Example: ``user_reports_root("alice") -> .../ui-runs/users/alice``.
    """
    from dicompipe.ui.access import user_folder
    return reports_root() / "users" / user_folder(user) if user else reports_root()


# --------------------------------------------------------------------------- input
def discover(path) -> tuple[list[SeriesInfo], SeriesInfo]:
    """``io.discover`` + ``io.select``: every candidate and the chosen one (with ``.reason``)."""
    series = io.discover(path)
    return series, io.select(series)


# --------------------------------------------------------------------------- model
def load_bundle(organ: str):
    """The bundle the app uses for ``organ`` (override or the organ config's built-in)."""
    from dicompipe import model as model_stage

    name = model_override() or organs.get(organ).model
    return model_stage.load_bundle(name, organ=organ, allow_untrained=allow_untrained())


# --------------------------------------------------------------------------- analysis
#: what the app writes for each case (its downloads offer these)
FORMATS = ("txt", "png", "json")


def run_case(path, *, organ: str, series: str | None, include_phi: bool, select_slices: bool,
             progress: Callable[[str, float, str], None] | None,
             model: Any = None, user: str | None = None) -> CaseResult:
    """:func:`dicompipe.pipeline.run_case` with the app's settings: TXT, PNG and JSON into a
    new run folder under :func:`user_reports_root` (``<root>/users/<user>/`` for a signed-in
    user), recorded in the default case history with the user.

    ``model``: a preloaded bundle (or a mapping organ -> bundle for organ "auto").
    """
    from dicompipe.pipeline import run_case as _run_case

    out = user_reports_root(user)
    out.mkdir(parents=True, exist_ok=True)
    return _run_case(path, organ=organ, out=out, formats=FORMATS, user=user,
                     include_phi=include_phi, progress=progress, series=series,
                     select_slices=select_slices, allow_untrained=allow_untrained(),
                     backend=backend_override(),
                     model=model if model is not None else model_override())


def downloads(run_dir: Path) -> dict[str, tuple[str, bytes, str]]:
    """What the download buttons offer: key -> (file name, bytes, mime), from a run folder."""
    run_dir = Path(run_dir)
    out: dict[str, tuple[str, bytes, str]] = {}
    txt = run_dir / "report.txt"
    if txt.is_file():
        out["txt"] = ("report.txt", txt.read_bytes(), "text/plain")
    js = run_dir / "analysis.json"
    if js.is_file():
        out["json"] = ("analysis.json", js.read_bytes(), "application/json")
    pngs = sorted(p for p in run_dir.rglob("*.png") if p.is_file())
    if pngs:
        out["png"] = (f"{run_dir.name}-images.zip", _zip(pngs, run_dir), "application/zip")
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    if files:
        out["zip"] = (f"{run_dir.name}.zip", _zip(files, run_dir), "application/zip")
    return out


def _zip(files: list[Path], root: Path) -> bytes:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f"{root.name}/{f.relative_to(root).as_posix()}")
    return buf.getvalue()


# --------------------------------------------------------------------------- history
def history_rows(since: _dt.date | None = None, organ: str | None = None,
                 user: str | None = None) -> list[dict]:
    """Recorded cases, newest first (:func:`dicompipe.history.list_records`); only
    ``user``'s cases when one is given."""
    from dicompipe import history
    return history.list_records(since=since.isoformat() if since else None, organ=organ or None,
                                user=user)


# --------------------------------------------------------------------------- viewer
def cam_slice(analysis: Analysis, label: str, z: int) -> np.ndarray | None:
    """Raw Grad-CAM of ``label`` on CT slice ``z`` (y, x), a copy, from the explain stage."""
    from dicompipe.explain import cam_slice as explain_cam_slice
    return explain_cam_slice(analysis.cams, analysis.batch, label, z)


def cam_display(analysis: Analysis, label: str, z: int) -> np.ndarray | None:
    """Grad-CAM of ``label`` on CT slice ``z`` as the report images draw it: smoothed and in
    [0, 1] of the volume-wide maximum (:func:`dicompipe.report.figures.display_cam`)."""
    from dicompipe.report.figures import display_cam
    return display_cam(analysis, label, z)
