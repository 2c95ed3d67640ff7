"""Small helpers shared by the PACS front ends: UID pseudonyms for logs, peer addresses,
the report formats a PACS exchange needs.

Example::

    >>> short_uid("1.2.840.113619.2.55.3")
    'u:8ca0727b40'
    >>> parse_peer("ORTHANC@127.0.0.1:4242")
    Peer(aet='ORTHANC', host='127.0.0.1', port=4242)
"""
from __future__ import annotations

import hashlib
import logging
import re
import sys
from dataclasses import dataclass

from dicompipe.errors import PacsError

_AET = re.compile(r"^[ -~]{1,16}$")          # printable ASCII, no backslash checked below
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def short_uid(uid: object) -> str:
    """A stable, non-reversible label for a UID in logs (``u:`` + 10 hex of its SHA-256):
    the same series has the same label everywhere, and no UID is written out."""
    return "u:" + hashlib.sha256(str(uid or "").strip().encode()).hexdigest()[:10]


def is_uid(text: object) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(text, str) and len(text) <= 64 and bool(_UID.match(text))


def check_aet(aet: str, what: str = "AE title") -> str:
    """``aet`` if it is a valid AE title (1-16 printable ASCII characters, no backslash,
    not only spaces), else :class:`PacsError`."""
    if not isinstance(aet, str) or not _AET.match(aet) or "\\" in aet or not aet.strip():
        raise PacsError(f"{what} {aet!r} is not a DICOM AE title (1-16 printable ASCII "
                        "characters, no backslash).")
    return aet.strip()


@dataclass(frozen=True)
class Peer:
    """A DICOM peer: AE title, host, port."""
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``"AE@host:port"`` -> :class:`Peer` (an IPv6 host in brackets: ``AE@[::1]:104``)."""
    aet, sep, rest = (text or "").rpartition("@")
    host, colon, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PacsError(f"{text!r} is not AE@host:port (e.g. PACS@10.0.0.5:104).")
    return Peer(check_aet(aet), host, int(port))


def with_dicom(formats) -> list[str]:
    """The report formats to write when the SR and SC are sent on: ``formats`` (default:
    :data:`dicompipe.report.DEFAULT_FORMATS`) plus "dicom".

    >>> with_dicom("json")
    ['json', 'dicom']
    """
    from dicompipe.report import parse_formats
    fmts = parse_formats(formats)
    return fmts if "dicom" in fmts else [*fmts, "dicom"]


def result_files(run_dir) -> list:
    """The DICOM files of a run folder to send to a PACS: ``sr.dcm`` then ``sc/*.dcm``."""
    from pathlib import Path
    run_dir = Path(run_dir)
    files = [run_dir / "sr.dcm"] if (run_dir / "sr.dcm").is_file() else []
    return files + sorted((run_dir / "sc").glob("*.dcm"))


class OwnRecords(logging.Filter):
    """Passes dicompipe's log records and pynetdicom's warnings and errors, drops the rest:
    highdicom logs SOP Instance UIDs at INFO, and Python warnings from pydicom or highdicom
    can quote attribute values (a patient name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "dicompipe" or record.name.startswith("dicompipe."):
            return True
        return record.name.startswith("pynetdicom") and record.levelno >= logging.WARNING


def setup_logging(stream=None) -> logging.Handler:
    """Log dicompipe's INFO lines (and pynetdicom's warnings) to ``stream`` (stderr), with
    Python warnings routed into logging and dropped by :class:`OwnRecords`. Returns the
    handler (remove it and call ``logging.captureWarnings(False)`` to undo)."""
    global _HANDLER
    root = logging.getLogger()
    if _HANDLER is not None:                       # called again: replace, never duplicate
        root.removeHandler(_HANDLER)
    _HANDLER = logging.StreamHandler(stream or sys.stderr)
    _HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    _HANDLER.addFilter(OwnRecords())
    root.addHandler(_HANDLER)
    logging.getLogger("dicompipe").setLevel(logging.INFO)
    logging.captureWarnings(False)                 # (re)install over the current showwarning
    logging.captureWarnings(True)
    return _HANDLER


_HANDLER: logging.Handler | None = None
