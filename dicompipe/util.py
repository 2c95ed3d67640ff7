"""Small helpers every layer may use: atomic file writes, clean-up of leftovers of killed
runs, and how many CPUs this process may use. Imports nothing of dicompipe.

A file is written to a temporary name beside its destination and renamed into place, so a
reader never sees half a file.

Example::

    >>> with atomic_path("out/report.txt") as tmp:
    ...     tmp.write_text("hello")
    >>> write_text("out/notes.txt", "hello")
    >>> cpu_count(), physical_cores()
    (2, 1)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: permissions for new files and folders (what open()/mkdir() would give under the umask);
#: mkstemp/mkdtemp would otherwise leave them private (0600/0700)
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    ``suffix``: the temporary name's ending (default ``.part`` + the target's suffixes, so
    that writers that pick a format from the name still do).
    """
    path = Path(path)
    if suffix is None:
        suffix = ".part" + "".join(path.suffixes)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
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
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(suffix)):
            continue
        try:
            if (not e.is_dir(follow_symlinks=False)
                    or now - e.stat(follow_symlinks=False).st_mtime < older_than):
                continue
        except OSError:
            continue
        head = e.name[len(prefix):].split("-", 1)[0]
        if head.isdigit() and _pid_alive(int(head)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed


def cpu_count() -> int:
    """Logical CPUs this process may run on (its affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-thread siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for c in cpus:
        f = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")
        try:
            cores.add(f.read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def cpu_key() -> str:
    """A short hash of the CPU model name and its flags (``/proc/cpuinfo``; else the
    platform's processor string)."""
    import hashlib
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        text = "\n".join(dict.fromkeys(lines))
    except OSError:
        text = platform.processor() or platform.machine()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def user_cache(kind: str) -> Path:
    """``$DICOMPIPE_CACHE/<kind>``, else ``$XDG_CACHE_HOME/dicompipe/<kind>`` (~/.cache).

    >>> user_cache("openvino")        # doctest: +SKIP
    PosixPath('/root/.cache/dicompipe/openvino')
    """
    if os.environ.get("DICOMPIPE_CACHE"):
        return Path(os.environ["DICOMPIPE_CACHE"]).expanduser() / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "dicompipe" / kind


def writable(folder: Path) -> bool:
    """True when ``folder`` exists (made if needed) and a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe"):
            pass
        return True
    except OSError:
        return False


def lazy_getattr(package: str, where: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) importing ``package.<where[name]>`` on the first
    use of ``name`` and caching the value in the package, so that importing the package
    pulls in nothing heavy (torch, MONAI).

    >>> __getattr__ = lazy_getattr(__name__, {"resnet50": "network"})
    """
    import importlib
    import sys

    def __getattr__(name):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__

