"""Safe extraction of a zipped DICOM export into a temporary folder.

Rules: member names must be relative and stay inside the folder (no ``..``, no absolute
paths or drive letters), symbolic links and special files are refused, the number of
members and the total uncompressed size are bounded, and encrypted members are refused.
Before anything is extracted, the sizes declared in the zip's directory are checked: their
total against ``max_bytes`` and the free space of the temporary folder, and each large
member's compression ratio against ``MAX_RATIO`` (a zip bomb). While writing, the bytes are
counted again, so a lying directory cannot get past the bound either.

Temporary folders are named ``dicompipe-zip-<pid>-*``; one left behind by a killed run
(older than an hour, its process gone) is removed by the next extraction.

Lifetime: the folder belongs to an :class:`ExtractedArchive`. Every ``InstanceRef``
discovered inside it keeps a reference to that object in ``meta["keep"]``, so the folder
lives exactly as long as any ``SeriesInfo`` or ``Volume`` that points into it; it is
removed when the last of them is garbage-collected, at interpreter exit, or at once by
calling :meth:`ExtractedArchive.cleanup` (also a context manager).

Example::

    >>> with extract_zip("export.zip") as arc:
    ...     print(arc.path)            # temporary folder, removed on exit
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import weakref
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from dicompipe.errors import UnsupportedInput

#: default bounds for one archive (override with discover(max_zip_bytes=..., max_zip_members=...))
MAX_ZIP_BYTES = 8 * 1024 ** 3
MAX_ZIP_MEMBERS = 100_000
#: largest uncompressed/compressed ratio accepted for a member over RATIO_MIN_BYTES
#: (DICOM compresses 2-10x, the air around a body rarely beyond 50x; a bomb is 1000x)
MAX_RATIO = 200
RATIO_MIN_BYTES = 16 << 20
_CHUNK = 1 << 20
PREFIX = "dicompipe-zip-"


class ExtractedArchive:
    """A temporary folder holding a zip's safe contents; removed when no longer referenced."""

    def __init__(self, zip_path: Path, folder: Path):
        self.zip_path = Path(zip_path)
        self.path = Path(folder)
        self.members: dict[str, str] = {}            # extracted file -> member name
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(folder), True)

    def cleanup(self) -> None:
        """Remove the folder now (later reads of its files will fail)."""
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def __enter__(self):
        return self

    def __copy__(self):
        return self                      # one folder, shared: copies of a SeriesInfo share it

    def __deepcopy__(self, memo):
        return self

    def __exit__(self, *exc):
        self.cleanup()

    def __repr__(self):
        return f"ExtractedArchive({str(self.zip_path)!r} -> {str(self.path)!r})"


def _safe_name(name: str) -> PurePosixPath | None:
    """The member's relative path, or None if it would escape the folder."""
    n = name.replace("\\", "/")
    p = PurePosixPath(n)
    if not n or n.startswith("/") or (len(n) > 1 and n[1] == ":") or ".." in p.parts:
        return None
    parts = [x for x in p.parts if x not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def extract_zip(zip_path, *, max_bytes: int = MAX_ZIP_BYTES,
                max_members: int = MAX_ZIP_MEMBERS, tmp_dir=None) -> ExtractedArchive:
    """Extract ``zip_path`` safely into a new temporary folder (see module docstring).

    Raises :class:`UnsupportedInput` for a damaged, unsafe or oversized archive; nothing
    is left on disk in that case.
    """
    zip_path = Path(zip_path)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnsupportedInput(f"Cannot open {zip_path} as a zip archive ({e}). "
                               "Give the export folder itself, or re-create the zip.") from e
    from dicompipe.util import remove_stale
    tmp_root = Path(tmp_dir) if tmp_dir else Path(tempfile.gettempdir())
    remove_stale(tmp_root, PREFIX)
    try:
        _check_declared(zf, zip_path, max_bytes, max_members, tmp_root)
    except BaseException:
        zf.close()
        raise
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=tmp_dir))
    arc = ExtractedArchive(zip_path, folder)
    try:
        with zf:
            infos = zf.infolist()
            total = 0
            for info in infos:
                mode = info.external_attr >> 16
                if info.is_dir():
                    continue
                rel = _safe_name(info.filename)
                if rel is None:
                    raise UnsupportedInput(f"Unsafe member {info.filename!r} in {zip_path} (absolute path "
                                           "or '..' would write outside the extraction folder); refused.")
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):       # symlink, device, fifo...
                    raise UnsupportedInput(f"Member {info.filename!r} in {zip_path} is a symbolic link or "
                                           "special file; refused. Zip the files themselves.")
                if info.flag_bits & 0x1:
                    raise UnsupportedInput(f"Member {info.filename!r} in {zip_path} is encrypted; "
                                           "decrypt the archive first.")
                target = folder.joinpath(*rel.parts)
                if not str(target.resolve().parent).startswith(str(folder.resolve())):
                    raise UnsupportedInput(f"Unsafe member {info.filename!r} in {zip_path}; refused.")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        total += len(chunk)
                        if total > max_bytes:
                            raise UnsupportedInput(
                                f"{zip_path} expands to more than {max_bytes / 1024 ** 3:.1f} GiB; refused "
                                "(a zip bomb or a very large export). Extract it yourself and give the folder.")
                        dst.write(chunk)
                arc.members[str(target)] = info.filename
    except UnsupportedInput:
        arc.cleanup()
        raise
    except OSError as e:
        arc.cleanup()
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UnsupportedInput(f"Cannot extract {zip_path}: no space left in the temporary "
                                   f"folder {tmp_root}. Free space, set TMPDIR to a larger disk, "
                                   "or extract the zip yourself and give the folder.") from e
        raise UnsupportedInput(f"Cannot extract {zip_path}: {e}. The archive is damaged or "
                               "unreadable; re-create it or give the folder.") from e
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, zlib.error,
            NotImplementedError) as e:
        arc.cleanup()
        raise UnsupportedInput(f"Cannot extract {zip_path}: {e}. The archive is damaged; "
                               "re-create it or give the folder.") from e
    return arc


def _fmt(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def _check_declared(zf: zipfile.ZipFile, zip_path: Path, max_bytes: int, max_members: int,
                    tmp_root: Path) -> None:
    """Refuse, before extracting anything, a zip whose directory declares too many members,
    more than ``max_bytes`` in all or more than the free space, or a member compressed more
    than ``MAX_RATIO`` times (a zip bomb)."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise UnsupportedInput(f"{zip_path} has {len(infos)} members, more than the allowed "
                               f"{max_members}. Extract it yourself and give the folder.")
    for info in infos:
        if info.file_size > RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise UnsupportedInput(
                f"{zip_path}: member {info.filename!r} expands from {info.compress_size} bytes to "
                f"{_fmt(info.file_size)} (ratio {info.file_size / max(info.compress_size, 1):.0f}:1, "
                f"more than {MAX_RATIO}:1): a zip bomb. Refused; nothing was extracted.")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise UnsupportedInput(
            f"{zip_path} expands to more than the allowed {_fmt(max_bytes)} ({_fmt(total)} "
            "declared: a zip bomb or a very large export). Refused; nothing was extracted. "
            "Extract it yourself and give the folder.")
    try:
        free = shutil.disk_usage(tmp_root).free
    except OSError:
        return
    if total > free:
        raise UnsupportedInput(
            f"{zip_path} expands to {_fmt(total)} but the temporary folder {tmp_root} has "
            f"{_fmt(free)} free. Free space, set TMPDIR to a larger disk, or extract the "
            "zip yourself and give the folder.")


def is_zip(path) -> bool:
    """True for a file that is a zip archive (by content, not by name)."""
    p = Path(path)
    return p.is_file() and zipfile.is_zipfile(p)


__all__ = ["ExtractedArchive", "extract_zip", "is_zip", "MAX_ZIP_BYTES", "MAX_ZIP_MEMBERS",
           "MAX_RATIO"]
