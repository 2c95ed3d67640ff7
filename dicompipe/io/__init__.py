"""Input stage: find, choose and load CT series (DICOM folders/zips/files, PNG/JPG slices, NIfTI).

Example::

    >>> from dicompipe import io
    >>> series = io.discover("export/")      # list[SeriesInfo], headers only
    >>> chosen = io.select(series)           # SeriesInfo with .reason
    >>> vol = io.load(chosen)                # Volume (HU, LPS)
"""
from dicompipe.types import InstanceRef, SeriesInfo, Volume  # noqa: F401


def discover(path, **kwargs) -> list[SeriesInfo]:
    raise NotImplementedError


def select(series: list[SeriesInfo], **kwargs) -> SeriesInfo:
    raise NotImplementedError


def load(series: SeriesInfo, **kwargs) -> Volume:
    raise NotImplementedError
