"""dicompipe: DICOM-native CT analysis (lung, pancreas). Research use only.

Example::

    >>> import dicompipe
    >>> a = dicompipe.analyze("study/", organ="lung")
    >>> a.verdict.label, a.verdict.probabilities
"""
from dicompipe._version import __version__  # noqa: F401
from dicompipe.errors import (  # noqa: F401
    BatchError,
    DicompipeError,
    HistoryError,
    ModelError,
    NoSeriesFound,
    PacsError,
    PreprocessError,
    ReportError,
    UnreadableSeries,
    UnsupportedInput,
)
from dicompipe.types import RESEARCH_USE, Analysis, SeriesInfo, Volume  # noqa: F401

#: public subpackages reached as attributes (``dicompipe.io.discover``), imported on first use
#: so that ``import dicompipe`` stays light (no pydicom, SimpleITK or torch)
_LAZY = ("io", "preprocess", "model", "explain", "report", "history", "pipeline", "batch")


def analyze(*args, **kwargs) -> Analysis:
    """Run the whole pipeline; see :func:`dicompipe.pipeline.analyze`."""
    from dicompipe.pipeline import analyze as _analyze
    return _analyze(*args, **kwargs)


def run_case(*args, **kwargs):
    """Analyse, write the reports, record the case; see :func:`dicompipe.pipeline.run_case`."""
    from dicompipe.pipeline import run_case as _run_case
    return _run_case(*args, **kwargs)


def __getattr__(name: str):
    if name == "Analyzer":          # many cases in one process: see pipeline.Analyzer
        from dicompipe.pipeline import Analyzer
        return Analyzer
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"dicompipe.{name}")
    raise AttributeError(f"module 'dicompipe' has no attribute {name!r}")
