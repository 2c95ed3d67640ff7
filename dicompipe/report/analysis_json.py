"""``analysis.json``: :meth:`Analysis.to_dict` plus what the report writer did.

The document carries ``schema_version`` (``Analysis.SCHEMA_VERSION``) and a ``report``
section (writer version, files written, notes such as generated DICOM UIDs). Patient
identifiers appear only with ``include_phi``.

Example::

    >>> from dicompipe.report import analysis_json
    >>> d = analysis_json.render(analysis)
    >>> d["verdict"]["label"], d["schema_version"]
    >>> analysis_json.write(analysis, "out/analysis.json")
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from dicompipe.types import Analysis
from dicompipe.util import write_text


def _finite(o):
    """NaN/inf are not JSON: make them null so every JSON reader accepts the file."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


def render(analysis: Analysis, *, include_phi: bool = False, files: list[str] | None = None,
           notes: list[str] | None = None) -> dict:
    """The analysis.json document as a dict."""
    from dicompipe._version import __version__

    a = dataclasses.replace(analysis, include_phi=include_phi)
    d = a.to_dict()
    d["report"] = {"writer": f"dicompipe {__version__}", "include_phi": include_phi,
                   "files": list(files or []), "notes": list(notes or [])}
    return _finite(d)


def write(analysis: Analysis, path: str | Path, *, include_phi: bool = False,
          files: list[str] | None = None, notes: list[str] | None = None) -> Path:
    """Write :func:`render` as indented UTF-8 JSON, atomically; returns ``path``."""
    d = render(analysis, include_phi=include_phi, files=files, notes=notes)
    return write_text(path, json.dumps(d, indent=2, ensure_ascii=False, default=str) + "\n")
