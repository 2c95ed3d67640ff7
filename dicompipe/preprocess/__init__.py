"""Preprocess stage: HU windowing, SimpleITK resampling, slice selection, 224x224 tensors.

Example::

    >>> from dicompipe import preprocess
    >>> batch = preprocess.prepare(volume, spec, organ="lung")   # SliceBatch
    >>> cam_on_ct = preprocess.to_volume(batch, maps)             # SimpleITK.Image on the CT grid
"""
from dicompipe.types import PreprocessSpec, SliceBatch, Volume  # noqa: F401


def prepare(volume: Volume, spec: PreprocessSpec, *, organ: str | None = None,
            select_slices: bool = True, selection: dict | None = None) -> SliceBatch:
    raise NotImplementedError


def to_volume(batch: SliceBatch, maps):
    """Map per-row 2D maps (n_included, h, w) back onto the source volume grid."""
    raise NotImplementedError
