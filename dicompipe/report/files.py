"""Atomic file writing and run-folder creation for the report writers.

A file is written to a temporary name beside its destination and renamed into place, so a
reader never sees half a file. A run folder is assembled in a hidden staging folder and
renamed to its final, never-used name in one step.

Example::

    >>> with atomic_path("out/report.txt") as tmp:
    ...     tmp.write_text("hello")
    >>> write_text("out/notes.txt", "hello")
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dicompipe.errors import ReportError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: permissions for new files and folders (what open()/mkdir() would give under the umask);
#: mkstemp/mkdtemp would otherwise leave them private (0600/0700)
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + "".join(path.suffixes),
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, FILE_MODE)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "-", s).strip("-").lower() or "run"


#: leftovers of a killed run older than this (seconds) whose process is gone are removed
STALE_AFTER_S = 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True                       # exists (another user's), or cannot tell: keep
    return True


def remove_stale(folder: str | Path, prefix: str, suffix: str = "",
                 older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove folders ``<folder>/<prefix><pid>-*<suffix>`` left by killed runs: only those
    older than ``older_than`` seconds whose process ``pid`` is gone (names without a pid,
    from older versions, only by age). Symbolic links and files are never touched. Returns
    what was removed; errors are ignored (another run may be removing the same folder).

    Example::

        >>> remove_stale("runs", ".dicompipe-run-", ".partial")
        [PosixPath('runs/.dicompipe-run-4242-k2j1.partial')]
    """
    import time
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(suffix)):
            continue
        try:
            if not e.is_dir(follow_symlinks=False) or now - e.stat(follow_symlinks=False).st_mtime < older_than:
                continue
        except OSError:
            continue
        head = e.name[len(prefix):].split("-", 1)[0]
        if head.isdigit() and _pid_alive(int(head)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


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
