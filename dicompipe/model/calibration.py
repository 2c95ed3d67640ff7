"""The input kinds a bundle's calibration is measured on (what inference needs of it; the
temperature is applied in :mod:`dicompipe.model.aggregate`, fitted in
:mod:`dicompipe.train.calibration`).

Example::

    >>> input_kind(volume.windowed)
    'HU DICOM'
"""
from __future__ import annotations

# --------------------------------------------------------------------------- per input kind
#: The kinds of input a bundle meets, as named in ``metadata["calibration"]["ece"]``: PNG/JPG
#: slices already windowed to 8 bits, and Hounsfield-unit volumes (DICOM series or NIfTI).
INPUT_KINDS = ("8-bit slices", "HU DICOM")


def input_kind(windowed: bool) -> str:
    """The input kind of a volume: "8-bit slices" when already windowed, else "HU DICOM".

    >>> input_kind(True)
    '8-bit slices'
    """
    return INPUT_KINDS[0] if windowed else INPUT_KINDS[1]
