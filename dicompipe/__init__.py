"""dicompipe: DICOM-native CT analysis (lung, pancreas). Research use only.

Example::

    >>> import dicompipe
    >>> a = dicompipe.analyze("study/", organ="lung")
    >>> a.verdict.label, a.verdict.probabilities
"""
from dicompipe import io  # noqa: F401  (public: dicompipe.io.discover/select/load)
from dicompipe.errors import (  # noqa: F401
    DicompipeError, HistoryError, ModelError, NoSeriesFound, PreprocessError, ReportError,
    UnreadableSeries, UnsupportedInput,
)
from dicompipe.types import RESEARCH_USE, Analysis, Volume, SeriesInfo  # noqa: F401

__version__ = "0.1.0"


def analyze(*args, **kwargs) -> Analysis:
    """Run the whole pipeline; see :func:`dicompipe.pipeline.analyze`."""
    from dicompipe.pipeline import analyze as _analyze
    return _analyze(*args, **kwargs)
