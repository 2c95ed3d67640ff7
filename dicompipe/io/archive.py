"""Safe extraction of a zipped DICOM export into a temporary folder.

Rules: member names must be relative and stay inside the folder (no ``..``, no absolute
paths or drive letters), symbolic links and special files are refused, the number of
members and the total uncompressed size are bounded (counted while writing, not trusted
from the zip headers), and encrypted members are refused.

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

import shutil
import stat
import tempfile
import weakref
import zipfile
from pathlib import Path, PurePosixPath

from dicompipe.errors import UnsupportedInput

#: default bounds for one archive (override with discover(max_zip_bytes=..., max_zip_members=...))
MAX_ZIP_BYTES = 8 * 1024 ** 3
MAX_ZIP_MEMBERS = 100_000
_CHUNK = 1 << 20


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
    folder = Path(tempfile.mkdtemp(prefix="dicompipe-zip-", dir=tmp_dir))
    arc = ExtractedArchive(zip_path, folder)
    try:
        with zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise UnsupportedInput(f"{zip_path} has {len(infos)} members, more than the allowed "
                                       f"{max_members}. Extract it yourself and give the folder.")
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
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        arc.cleanup()
        raise UnsupportedInput(f"Cannot extract {zip_path}: {e}. The archive is damaged; "
                               "re-create it or give the folder.") from e
    return arc


def is_zip(path) -> bool:
    """True for a file that is a zip archive (by content, not by name)."""
    p = Path(path)
    return p.is_file() and zipfile.is_zipfile(p)


__all__ = ["ExtractedArchive", "extract_zip", "is_zip", "MAX_ZIP_BYTES", "MAX_ZIP_MEMBERS"]
