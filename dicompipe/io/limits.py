"""Memory budget for loading a volume, checked *before* anything volume-sized is allocated.

The budget is ``max_memory`` bytes when given (the CLI's ``--max-memory 4G``), else
``$DICOMPIPE_MAX_MEMORY``, else 75 % of the memory available now (``MemAvailable`` on
Linux). A load that would need more raises :class:`UnreadableSeries` saying how much, so a
hostile header (Rows = Columns = 65535) or a huge volume fails with a message, not with the
machine swapping or the process killed.

Example::

    >>> parse_size("4G"), parse_size("512M"), parse_size(10_000)
    (4294967296, 536870912, 10000)
    >>> check_budget(3 * 512 * 512 * 8, "series s1 (3 slices of 512 x 512)")
"""
from __future__ import annotations

import os
import re

from dicompipe.errors import UnreadableSeries, UnsupportedInput

ENV = "DICOMPIPE_MAX_MEMORY"
#: bytes per voxel a load may hold at its peak: the float32 volume plus one working copy
BYTES_PER_VOXEL = 8
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text) -> int:
    """``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"1000000"`` (bytes) → bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise UnsupportedInput(f"Memory size {text!r} not understood: use e.g. 4G, 512M or a "
                               "number of bytes.")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def available_memory() -> int:
    """Bytes of memory available now (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def budget(max_memory=None) -> int:
    """The budget in bytes: ``max_memory``, else ``$DICOMPIPE_MAX_MEMORY``, else 75 % of
    the available memory."""
    if max_memory is not None:
        return parse_size(max_memory)
    if os.environ.get(ENV):
        return parse_size(os.environ[ENV])
    return int(0.75 * available_memory())


def _fmt(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= (1 << 30) else f"{n / (1 << 20):.0f} MiB"


def check_budget(nbytes: int, what: str, max_memory=None) -> None:
    """Raise :class:`UnreadableSeries` when loading ``what`` needs more than the budget."""
    limit = budget(max_memory)
    if nbytes > limit:
        raise UnreadableSeries(
            f"Loading {what} needs about {_fmt(nbytes)} of memory, more than the allowed "
            f"{_fmt(limit)}. If the header is right, run on a machine with more memory or raise "
            f"the limit (--max-memory / ${ENV}); if not, the file's dimensions are corrupt.")


__all__ = ["parse_size", "available_memory", "budget", "check_budget", "BYTES_PER_VOXEL", "ENV"]
