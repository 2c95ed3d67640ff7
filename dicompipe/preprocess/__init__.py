"""Preprocess stage: HU windowing, SimpleITK resampling, slice selection, 224x224 tensors.

Example::

    >>> from dicompipe import preprocess
    >>> batch = preprocess.prepare(volume, spec, organ="lung")   # SliceBatch
    >>> cam_on_ct = preprocess.to_volume(batch, maps)             # SimpleITK.Image on the CT grid
"""
from dicompipe.preprocess.inverse import to_slice, to_volume, to_volume_uint8  # noqa: F401  (explain stage)
from dicompipe.preprocess.prepare import prepare  # noqa: F401
from dicompipe.preprocess.render import render, square_pad, window  # noqa: F401
from dicompipe.types import PreprocessSpec, SliceBatch, Volume  # noqa: F401
