"""Uploads -> a private temporary folder the pipeline can read.

Uploaded files (DICOM files with or without extension, one zip of a DICOM folder, PNG/JPG
slices) are written into a fresh temporary folder; a zip is extracted safely inside it by
the io stage's :func:`dicompipe.io.archive.extract_zip` (no absolute paths, no ``..``, no
links, bounded size and member count). The folder is removed by :meth:`StagedInput.cleanup`
or when the object is garbage-collected.

Example::

    >>> staged = stage_uploads([("ct.zip", data)])
    >>> staged.path          # give this to dicompipe.io.discover / dicompipe.analyze
    >>> staged.cleanup()
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dicompipe.errors import UnsupportedInput
from dicompipe.io.archive import extract_zip as io_extract

#: total upload bound (all files together), bytes
MAX_TOTAL_BYTES = int(float(os.environ.get("DICOMPIPE_UI_MAX_TOTAL_MB", "2048")) * 2**20)
#: bound on what a zip may expand to, bytes, and on its number of members
MAX_UNZIPPED_BYTES = int(float(os.environ.get("DICOMPIPE_UI_MAX_UNZIPPED_MB", "4096")) * 2**20)
MAX_ZIP_MEMBERS = 20000

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class StagedInput:
    """An upload written to a temporary folder; ``path`` is what the pipeline reads."""

    path: Path
    names: list[str]
    n_bytes: int
    kind: str                                   # "zip" | "images" | "dicom" | "mixed"
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    _keep: object = field(default=None, repr=False)     # the io stage's ExtractedArchive

    def cleanup(self) -> None:
        """Remove the temporary folder (safe to call twice)."""
        if self._keep is not None and hasattr(self._keep, "cleanup"):
            self._keep.cleanup()
        self._keep = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def alive(self) -> bool:
        return self._tmp is not None and self.path.exists()

    @property
    def label(self) -> str:
        """Short human description, e.g. ``"ct.zip (12.3 MB)"`` or ``"40 files (8.1 MB)"``."""
        what = self.names[0] if len(self.names) == 1 else f"{len(self.names)} files"
        return f"{what} ({self.n_bytes / 2**20:.1f} MB)"


def _safe_name(name: str) -> str:
    """A plain file name from an uploaded name (no folders, no odd characters)."""
    base = re.split(r"[\\/]", name)[-1].strip() or "upload"
    base = re.sub(r"[^A-Za-z0-9._ -]+", "_", base).lstrip(".") or "upload"
    return base[:120]


def stage_uploads(files: Iterable[tuple[str, bytes]], *,
                  max_total_bytes: int = MAX_TOTAL_BYTES) -> StagedInput:
    """Write uploads ``(name, bytes)`` into a new temporary folder and return it.

    One zip is extracted into the folder; several files (DICOM or images) are written side
    by side. Raises :class:`UnsupportedInput` for nothing uploaded, too much data, several
    zips, a zip mixed with other files, or an unsafe zip.
    """
    files = [(n, d) for n, d in files]
    if not files:
        raise UnsupportedInput("Nothing was uploaded: choose DICOM files, a zip of a DICOM "
                               "folder, or PNG/JPG slices.")
    total = sum(len(d) for _, d in files)
    if total > max_total_bytes:
        raise UnsupportedInput(
            f"The upload is {total / 2**20:.0f} MB, above the limit of "
            f"{max_total_bytes / 2**20:.0f} MB: upload one series, or give a folder path on "
            "the server instead.")
    zips = [n for n, d in files if n.lower().endswith(".zip") or d[:4] == b"PK\x03\x04"]
    if zips and len(files) > 1:
        raise UnsupportedInput(
            f"Upload either one zip or individual files, not both ({len(zips)} zip(s) among "
            f"{len(files)} files).")
    tmp = tempfile.TemporaryDirectory(prefix="dicompipe-ui-")
    try:
        root = Path(tmp.name)
        if zips:
            name, data = files[0]
            stem = _safe_name(name)
            zpath = root / stem
            zpath.write_bytes(data)
            folder, keep = extract_zip(zpath, root / (Path(stem).stem or "upload"))
            zpath.unlink()
            named = root / (Path(stem).stem or "upload")     # a readable name in reports
            if folder != named and not named.exists():
                folder = folder.rename(named)
                keep = None          # its finalizer now has nothing left to remove; ours does
            return StagedInput(folder, [name], total, "zip", tmp, keep)
        dest = root / (_safe_name(Path(files[0][0]).stem) if len(files) == 1
                       else f"upload-{len(files)}-files")
        dest.mkdir()
        used: set[str] = set()
        for i, (name, data) in enumerate(files):
            safe = _safe_name(name)
            if safe in used:                       # same name twice: keep both
                safe = f"{i:05d}_{safe}"
            used.add(safe)
            (dest / safe).write_bytes(data)
        suffixes = {Path(n).suffix.lower() for n in used}
        kind = ("images" if suffixes <= IMAGE_SUFFIXES else
                "dicom" if not suffixes & IMAGE_SUFFIXES else "mixed")
        return StagedInput(dest, [n for n, _ in files], total, kind, tmp)
    except BaseException:
        tmp.cleanup()
        raise


def extract_zip(zpath: Path, dest: Path):
    """Extract ``zpath`` safely under ``dest``'s parent; returns (folder, keep-alive object),
    through the io stage's :func:`dicompipe.io.archive.extract_zip` (bounded, no traversal,
    no links) with the app's bounds."""
    arc = io_extract(zpath, max_bytes=MAX_UNZIPPED_BYTES, max_members=MAX_ZIP_MEMBERS,
                     tmp_dir=dest.parent)
    return arc.path, arc
