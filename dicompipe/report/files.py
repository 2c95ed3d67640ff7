"""Run folders for the report writers: assembled in a hidden staging folder and renamed to
their final, never-used name in one step (single files: :func:`dicompipe.util.atomic_path`).

Example::

    >>> stage = staging_dir("runs")
    >>> (stage / "report.txt").write_text("hello")
    >>> publish(stage, "runs", run_stem("lung"))
    PosixPath('runs/20260101-120000_lung')
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import tempfile
from pathlib import Path

from dicompipe.errors import ReportError
from dicompipe.util import DIR_MODE, remove_stale


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "-", s).strip("-").lower() or "run"


def staging_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (with parents) and a hidden staging folder inside it
    (``.dicompipe-run-<pid>-*.partial``); stale ones of killed runs are removed first.

    Raises :class:`ReportError` naming the folder when it cannot be created or written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale(out, ".dicompipe-run-", ".partial")
        stage = Path(tempfile.mkdtemp(prefix=f".dicompipe-run-{os.getpid()}-", suffix=".partial",
                                      dir=out))
        os.chmod(stage, DIR_MODE)
        return stage
    except OSError as e:
        why = e.strerror or str(e)
        raise ReportError(
            f"Cannot write the report folder under {out}: {why}. Choose a writable folder "
            "with --out (the analysis itself finished; nothing was written).") from e


def publish(staging: Path, out_dir: str | Path, stem: str) -> Path:
    """Rename the finished ``staging`` folder to a new ``<out_dir>/<stem>[_N]`` and return it.

    An existing run folder is never overwritten: a numeric suffix is added instead.
    """
    out = Path(out_dir)
    base = _slug(stem)
    for n in range(1, 10000):
        final = out / (base if n == 1 else f"{base}_{n}")
        if final.exists():
            continue
        try:
            os.rename(staging, final)   # fails if another run took the name meanwhile
            return final
        except OSError:
            if final.exists():
                continue
            raise
    raise ReportError(f"Could not find a free run-folder name for {base!r} under {out}.")


def run_stem(organ: str, now: _dt.datetime | None = None) -> str:
    """Default run-folder name: ``YYYYMMDD-HHMMSS_<organ>`` (UTC)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}_{organ}"


def discard(staging: Path) -> None:
    """Remove a staging folder after a failed run (never a published run folder)."""
    if staging.name.startswith(".dicompipe-run-") and staging.name.endswith(".partial"):
        shutil.rmtree(staging, ignore_errors=True)
