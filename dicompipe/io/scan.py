"""Find candidate volumes under a path: a folder (recursive, any file names), a DICOMDIR,
a zip of an export, a single DICOM (or multi-frame) file, PNG/JPG slices, or NIfTI.

Only headers are read. Non-DICOM files are skipped and counted; damaged DICOM files are
skipped with their name and reason; the input is never written to.

Example::

    >>> found = discover("export.zip")
    >>> [s.key for s in found], found.skipped_summary
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from dicompipe.errors import NoSeriesFound, UnsupportedInput
from dicompipe.io.archive import MAX_ZIP_BYTES, MAX_ZIP_MEMBERS, extract_zip, is_zip
from dicompipe.io.dicom import Skipped, group_series, read_headers
from dicompipe.io.images import discover_images, is_image_file
from dicompipe.io.nifti import discover_nifti, is_nifti
from dicompipe.types import SeriesInfo


class Discovery(list):
    """``list[SeriesInfo]`` plus what was skipped: ``source``, ``skipped`` (a
    :class:`~dicompipe.io.dicom.Skipped`), ``skipped_summary`` (one line) and ``archive``
    (the :class:`~dicompipe.io.archive.ExtractedArchive` of a zip input, else None)."""

    def __init__(self, items=(), source: str = "", skipped: Skipped | None = None, archive=None):
        super().__init__(items)
        self.source = source
        self.skipped = skipped or Skipped()
        self.archive = archive

    @property
    def skipped_summary(self) -> str:
        return self.skipped.summary()


def _walk(folder: Path, skipped: Skipped | None = None) -> list[Path]:
    """Every regular file under ``folder`` (recursive, sorted; symlinked folders not followed).

    FIFOs, sockets and devices are never opened (reading one could block forever), and a
    symbolic link that loops or points nowhere is skipped; both are counted in ``skipped``.
    """
    out, stack = [], [str(folder)]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                st = os.stat(e.path)                       # follows links: ELOOP for a loop
            except OSError as err:
                if skipped is not None:
                    skipped.unreadable.append((e.path, f"cannot open: {err.strerror or err}"))
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(Path(e.path))
            elif skipped is not None and not stat.S_ISDIR(st.st_mode):
                skipped.unreadable.append((e.path, "not a regular file (FIFO, socket or device); "
                                                   "not opened"))
    return sorted(out)


def _check_regular(src: Path) -> None:
    """Refuse a FIFO, socket or device given as the input: opening it could block forever."""
    try:
        mode = os.stat(src).st_mode
    except OSError as e:
        raise UnsupportedInput(f"Cannot read {src}: {e.strerror or e}. Give a folder, a .zip, a "
                               "DICOM file, an image folder or a NIfTI file.") from e
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsupportedInput(f"{src} is not a regular file or folder (a FIFO, socket or device); "
                               "dicompipe does not read from it. Give a folder, a .zip, a DICOM "
                               "file, an image folder or a NIfTI file.")


def _dicomdir_files(path: Path) -> list[Path] | None:
    """Files referenced by a DICOMDIR, or None if it cannot be read as one."""
    import pydicom
    from pydicom.fileset import FileSet
    try:
        fs = FileSet(pydicom.dcmread(path))
        return [Path(inst.path) for inst in fs if Path(inst.path).is_file()]   # no FIFOs
    except Exception:  # a damaged DICOMDIR: fall back to scanning its folder
        return None


def discover(path, *, max_zip_bytes: int = MAX_ZIP_BYTES,
             max_zip_members: int = MAX_ZIP_MEMBERS) -> Discovery:
    """All candidate volumes under ``path`` as a :class:`Discovery` (a list of SeriesInfo).

    Raises :class:`UnsupportedInput` if ``path`` does not exist, is an unsafe zip or an
    unreadable single file, and :class:`NoSeriesFound` if nothing readable was found (the
    message counts what was).

    Example::

        >>> found = discover("export.zip", max_zip_bytes=2 * 1024 ** 3)
        >>> [(s.key, s.modality, s.n_instances, s.usable) for s in found]
    """
    src = Path(path)
    if not src.exists():
        raise UnsupportedInput(f"{src} does not exist. Give a folder, a .zip, a DICOM file, "
                               "an image folder or a NIfTI file.")
    _check_regular(src)
    archive = None
    root = src
    skipped = Skipped()
    if src.is_file() and is_zip(src):
        archive = extract_zip(src, max_bytes=max_zip_bytes, max_members=max_zip_members)
        root = archive.path
    if root.is_dir():
        files = _walk(root, skipped)
    elif is_nifti(root) or is_image_file(root):
        files = [root]
    else:
        files = [root]
        listed = None
        if root.name.upper() == "DICOMDIR" or _is_dicomdir(root):
            listed = _dicomdir_files(root)
            files = listed if listed is not None else _walk(root.parent, skipped)

    images = [f for f in files if is_image_file(f)]
    niftis = [f for f in files if is_nifti(f)]
    others = [f for f in files if not is_image_file(f) and not is_nifti(f)]
    nested_zips = [f for f in others if f.suffix.lower() == ".zip"]
    skipped.not_dicom += [str(f) for f in nested_zips]
    others = [f for f in others if f.suffix.lower() != ".zip"]

    found, sk = read_headers(others, keep=archive)
    skipped.merge(sk)
    out: list[SeriesInfo] = group_series(found, source=str(src))
    img_series, bad = discover_images(images, str(src))
    skipped.not_dicom += bad
    out += img_series
    for f in niftis:
        try:
            out.append(discover_nifti(f, str(src)))
        except Exception as e:  # noqa: BLE001 - a damaged NIfTI is skipped like a damaged DICOM
            skipped.unreadable.append((str(f), str(e)[:400]))
    _keys(out)
    if archive is not None:
        for s in out:
            for r in s.instances:
                r.meta.setdefault("keep", archive)
                member = archive.members.get(r.file)
                if member:
                    r.meta["archive_member"] = member
    summary = skipped.summary()
    for s in out:
        if summary:
            s.warnings.append(f"input {src}: {summary}")
    if not out and src.is_file() and archive is None:
        raise UnsupportedInput(
            f"{src} is not a file dicompipe can read"
            + (f" ({skipped.unreadable[0][1]})" if skipped.unreadable else "")
            + ": give a DICOM file, a folder or .zip of DICOM files, PNG/JPG slices or a NIfTI file.")
    if not out:
        n = len(files)
        raise NoSeriesFound(
            f"Nothing readable under {src}: {n} file(s) looked at"
            + (f"; {summary}" if summary else "")
            + (f"; {len(skipped.documents)} documentation file(s) ("
               + ", ".join(os.path.basename(f) for f in skipped.documents[:3])
               + (" …" if len(skipped.documents) > 3 else "") + ")" if skipped.documents else "")
            + (f"; {len(skipped.dicomdir)} DICOMDIR index file(s) without images" if skipped.dicomdir else "")
            + ". Point dicompipe at a folder or zip of DICOM files, PNG/JPG slices or a NIfTI file.")
    return Discovery(out, source=str(src), skipped=skipped, archive=archive)


def _is_dicomdir(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    return b"1.2.840.10008.1.3.10" in head


def _keys(series: list[SeriesInfo]) -> None:
    used = {s.key for s in series if s.key}
    for kind in ("images", "nifti"):
        group = [s for s in series if s.kind == kind]
        for i, s in enumerate(group):
            k = kind if len(group) == 1 else f"{kind}{i + 1}"
            while k in used:
                k += "_"
            s.key = k
            used.add(k)
