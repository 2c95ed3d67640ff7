"""The app's only door into the library: thin wrappers over public stage functions.

Nothing here computes a result; it calls :mod:`dicompipe.io`, :func:`dicompipe.analyze`,
:mod:`dicompipe.report`, :mod:`dicompipe.history` and :mod:`dicompipe.model`, and adapts
their outputs for display. Tests replace these functions to drive the app without a model.

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
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dicompipe import io
from dicompipe.types import Analysis, SeriesInfo

ORGANS = ("lung", "pancreas")


# --------------------------------------------------------------------------- settings
def model_override() -> str | None:
    return os.environ.get("DICOMPIPE_UI_MODEL") or None


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
    from dicompipe.pipeline import load_config

    name = model_override() or load_config(organ)["model"]
    return model_stage.load_bundle(name, organ=organ, allow_untrained=allow_untrained())


# --------------------------------------------------------------------------- analysis
def analyze(path, *, organ: str, series: str | None, include_phi: bool, select_slices: bool,
            progress: Callable[[str, float, str], None] | None, model: Any = None) -> Analysis:
    """:func:`dicompipe.pipeline.analyze` with the app's settings.

    ``model``: a preloaded bundle (or a mapping organ -> bundle for organ "auto").
    """
    from dicompipe.pipeline import analyze as _analyze

    kwargs = dict(organ=organ, series=series, include_phi=include_phi,
                  select_slices=select_slices, progress=progress)
    if model is not None:
        kwargs["model"] = model
    elif model_override():
        kwargs["model"] = model_override()
    if allow_untrained():
        kwargs["allow_untrained"] = True
    try:
        return _analyze(path, **kwargs)
    except TypeError as e:                      # pipeline without allow_untrained / mapping hook
        if "allow_untrained" in str(e) and kwargs.pop("allow_untrained", None):
            return _analyze(path, **kwargs)
        raise


def write_reports(analysis: Analysis, include_phi: bool, out: Path | None = None,
                  user: str | None = None) -> Path:
    """``report.write`` (TXT, PNG, JSON) into a new run folder under :func:`reports_root`
    (``<root>/users/<user>/`` for a signed-in user)."""
    from dicompipe import report

    out = Path(out or user_reports_root(user))
    out.mkdir(parents=True, exist_ok=True)
    return Path(report.write(analysis, out, formats=["txt", "png", "json"],
                             include_phi=include_phi))


def record_history(analysis: Analysis, run_dir: Path | None, **kw) -> Any:
    from dicompipe import history
    return history.record(analysis, report_dir=run_dir, **kw)


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
    from dicompipe.explain import cam_volume
    img = cam_volume(analysis.cams, analysis.batch, label)
    if img is None:
        return None
    import SimpleITK as sitk
    return np.array(sitk.GetArrayViewFromImage(img)[z])   # copied while the image is held
