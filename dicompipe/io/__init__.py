"""Input stage: find, choose and load CT series (DICOM folders/zips/files, PNG/JPG slices, NIfTI).

Example::

    >>> from dicompipe import io
    >>> series = io.discover("export/")      # list[SeriesInfo], headers only
    >>> chosen = io.select(series)           # SeriesInfo with .reason
    >>> vol = io.load(chosen)                # Volume (HU, LPS)

Modules: ``scan`` (walk a path), ``dicom`` (headers, grouping), ``loader`` (DICOM
pixels → HU volume), ``images`` (PNG/JPG), ``nifti``, ``archive`` (safe zip extraction),
``choose`` (choice and reasons).
"""
from __future__ import annotations

from dicompipe.errors import UnreadableSeries, UnsupportedInput
from dicompipe.io.choose import describe, select
from dicompipe.io.scan import Discovery, discover
from dicompipe.types import InstanceRef, SeriesInfo, Volume  # noqa: F401


def load(series: SeriesInfo, *, spacing=None, max_gap: float | None = None,
         correct_tilt: bool = True, workers: int | None = None, max_memory=None) -> Volume:
    """Load a discovered series into a :class:`Volume`.

    DICOM: HU float32, LPS geometry, sorted along the normal, duplicates dropped, gaps up to
    ``max_gap`` mm (default 3 × median spacing) resampled, gantry tilt corrected
    (``correct_tilt``); ``workers`` threads decode pixels. PNG/JPG: 0..255 float32,
    ``windowed=True``, ``spacing=(x, y, z)`` mm (default 1 mm). NIfTI: float32, RAS→LPS.
    ``max_memory``: bytes (or "4G") the load may use, checked before allocating (default:
    75 % of the available memory, see :mod:`dicompipe.io.limits`). A volume with NaN or
    infinite voxels is refused (:class:`UnreadableSeries`).

    Example::

        >>> vol = load(select(discover("export/")), max_gap=10.0, max_memory="4G")
    """
    if series.kind == "dicom":
        from dicompipe.io.loader import load_dicom
        vol = load_dicom(series, max_gap=max_gap, correct_tilt=correct_tilt, workers=workers,
                         max_memory=max_memory)
    elif series.kind == "images":
        from dicompipe.io.images import load_images
        vol = load_images(series, spacing=spacing, max_memory=max_memory)
    elif series.kind == "nifti":
        from dicompipe.io.nifti import load_nifti
        vol = load_nifti(series, max_memory=max_memory)
    else:
        raise UnsupportedInput(f"Unknown series kind {series.kind!r} for {series.key}.")
    check_finite(vol)
    return vol


def check_finite(vol: Volume, chunk: int = 16) -> None:
    """Refuse a volume holding NaN or infinite voxels (a corrupt NIfTI, float pixel data...):
    they would flow into probabilities and reports. Checked ``chunk`` slices at a time."""
    import numpy as np
    arr = vol.array
    bad = 0
    for z in range(0, arr.shape[0], chunk):
        bad += int(arr[z:z + chunk].size - np.count_nonzero(np.isfinite(arr[z:z + chunk])))
    if bad:
        first = vol.series.instances[0].file if vol.series.instances else vol.series.source
        raise UnreadableSeries(
            f"Series {vol.series.key} ({first}): {bad} voxel(s) are NaN or infinite after "
            "loading, so the values cannot be Hounsfield units. The file is corrupt; re-export it.")


__all__ = ["discover", "select", "load", "describe", "Discovery"]
