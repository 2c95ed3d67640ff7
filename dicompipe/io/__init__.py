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

from dicompipe.errors import UnsupportedInput
from dicompipe.io.scan import Discovery, discover
from dicompipe.io.choose import describe, select
from dicompipe.types import InstanceRef, SeriesInfo, Volume  # noqa: F401


def load(series: SeriesInfo, *, spacing=None, max_gap: float | None = None,
         correct_tilt: bool = True, workers: int | None = None) -> Volume:
    """Load a discovered series into a :class:`Volume`.

    DICOM: HU float32, LPS geometry, sorted along the normal, duplicates dropped, gaps up to
    ``max_gap`` mm (default 3 × median spacing) resampled, gantry tilt corrected
    (``correct_tilt``); ``workers`` threads decode pixels. PNG/JPG: 0..255 float32,
    ``windowed=True``, ``spacing=(x, y, z)`` mm (default 1 mm). NIfTI: float32, RAS→LPS.

    Example::

        >>> vol = load(select(discover("export/")), max_gap=10.0)
    """
    if series.kind == "dicom":
        from dicompipe.io.loader import load_dicom
        return load_dicom(series, max_gap=max_gap, correct_tilt=correct_tilt, workers=workers)
    if series.kind == "images":
        from dicompipe.io.images import load_images
        return load_images(series, spacing=spacing)
    if series.kind == "nifti":
        from dicompipe.io.nifti import load_nifti
        return load_nifti(series)
    raise UnsupportedInput(f"Unknown series kind {series.kind!r} for {series.key}.")


__all__ = ["discover", "select", "load", "describe", "Discovery"]
