"""One exception family for every stage.

Messages say what was wrong, with which file or series, and what to do::

    raise NoSeriesFound(f"No usable CT series in {path}: found 2 SR objects. "
                        "Point dicompipe at the folder of the CT export.")
"""


class DicompipeError(Exception):
    """Base of every error dicompipe raises on purpose (the CLI prints it without a traceback)."""


class UnsupportedInput(DicompipeError):
    """The input is not something dicompipe can read (wrong file type, unsafe zip, ...)."""


class NoSeriesFound(DicompipeError):
    """Nothing usable was found; the message lists what was found instead."""


class UnreadableSeries(DicompipeError):
    """A series was found but cannot be turned into a volume (gaps, corrupt pixels, ...)."""


class PreprocessError(DicompipeError):
    """The volume cannot be prepared for the model (no slice in range, wrong spacing, ...)."""


class ModelError(DicompipeError):
    """A model bundle is missing, untrained, corrupt (sha256) or does not fit the request."""


class ReportError(DicompipeError):
    """An output could not be written."""


class HistoryError(DicompipeError):
    """The case-history database cannot be opened or written."""


class PacsError(DicompipeError):
    """A PACS exchange failed: a DICOMweb or DIMSE peer refused, could not be reached, or
    sent something that cannot be used (the message names the server, never a secret)."""


class BatchError(DicompipeError):
    """A cohort cannot be run: no studies, a bad manifest, an output folder in use or inside
    the input."""
