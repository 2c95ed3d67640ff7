"""Keep patient identifiers out of what dicompipe writes without ``--include-phi``.

Folder and file names of an export often carry a name or a record number
(``Doe_Jane_MRN12345_export/MRN12345_001.dcm``), and free text such as SeriesDescription
may too. Without ``include_phi`` every output (analysis.json, report.txt, the history,
the CLI's stdout) goes through a :class:`Redactor`, which replaces

- the input path (as given, absolute and resolved, and a zip's extraction folder) by
  ``<input>``, folders under it by ``<input>/dir-N``, and every source file by
  ``<input>/file-NNNN`` (numbered in the chosen series' slice order, then the other
  candidates'), also where only the file's base name appears;
- the SeriesDescription of every candidate and the patient's name and ID by ``<withheld>``.

Example::

    >>> r = Redactor.for_analysis(analysis)
    >>> r.text("skipped slice /data/Doe_Jane/MRN1_003.dcm: truncated")
    'skipped slice <input>/file-0003: truncated'
    >>> r.pseudonym_input()
    '<input>'
"""
from __future__ import annotations

import os
import re
from pathlib import Path

INPUT = "<input>"
WITHHELD = "<withheld>"
#: free text shorter than this is not replaced inside other text (it would hit ordinary words)
_MIN_TEXT = 6


def _forms(p: str) -> set[str]:
    """A path as given, absolute and resolved (the forms messages may use)."""
    out = {p, os.path.abspath(p)}
    try:
        out.add(str(Path(p).resolve()))
    except (OSError, RuntimeError):
        pass
    return {x for x in out if x and x not in (".", "/")}


class Redactor:
    """Replaces input paths, file names and identifying free text in strings (see module)."""

    def __init__(self, roots=(), files=(), texts=()):
        self.paths: dict[str, str] = {}              # exact path string -> label
        self.words: dict[str, str] = {}              # base names / free text -> label
        files = list(dict.fromkeys(str(f) for f in files if f))
        for k, f in enumerate(files, 1):
            label = f"{INPUT}/file-{k:04d}"
            for form in _forms(f):
                self.paths.setdefault(form, label)
            self.words.setdefault(os.path.basename(f), label)
        root_forms = set()
        for r in roots:
            if r:
                root_forms |= _forms(str(r))
        dirs: dict[str, str] = {}
        for f in files:
            for form in _forms(f):
                d = os.path.dirname(form)
                while d and d not in root_forms and d != os.path.dirname(d):
                    if any(d.startswith(rf + os.sep) for rf in root_forms):
                        dirs.setdefault(d, "")
                    d = os.path.dirname(d)
        for i, d in enumerate(sorted(dirs), 1):
            self.paths.setdefault(d, f"{INPUT}/dir-{i}")
        for rf in root_forms:
            self.paths.setdefault(rf, INPUT)
        for t in texts:
            t = str(t).strip() if t else ""
            if len(t) >= 3:
                self.words.setdefault(t, WITHHELD)
        self._paths = sorted(self.paths, key=len, reverse=True)
        self._words = [w for w in sorted(self.words, key=len, reverse=True) if len(w) >= 3]
        self._word_res: dict[tuple[str, ...], re.Pattern] = {}

    @classmethod
    def for_analysis(cls, analysis) -> Redactor:
        """The redactor for one :class:`~dicompipe.types.Analysis` (or anything with
        ``input``, ``series`` and ``candidates``)."""
        series = [analysis.series] + [c for c in (analysis.candidates or []) if c is not analysis.series]
        files = [i.file for s in series for i in s.instances]
        roots = [analysis.input] + [s.source for s in series]
        arc = getattr(analysis.candidates, "archive", None)
        if arc is not None:
            roots.append(str(arc.path))
        texts = [s.series_description for s in series
                 if s.series_description and len(s.series_description.strip()) >= _MIN_TEXT]
        texts += [t for s in series for t in (s.patient_name, s.patient_id) if t]
        return cls(roots, files, texts)

    def text(self, s: str) -> str:
        """``s`` with every known path, file name and identifying text replaced."""
        if not isinstance(s, str) or not s:
            return s
        if s in self.paths:                           # the common case: a whole path
            return self.paths[s]
        for p in self._paths:
            if p in s:
                s = s.replace(p, self.paths[p])
        # one alternation of every word (hundreds of file names) costs ~1 ms a string: only
        # the words the string contains go into the pattern
        found = tuple(w for w in self._words if w in s)
        if found:
            if found not in self._word_res:
                self._word_res[found] = re.compile("|".join(
                    rf"(?<![\w.-]){re.escape(w)}(?![\w-])" for w in found))
            s = self._word_res[found].sub(lambda m: self.words[m.group(0)], s)
        return s

    def walk(self, obj):
        """A copy of a JSON-like structure with every string value passed through :meth:`text`
        (keys are kept)."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            return {k: self.walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.walk(v) for v in obj]
        return obj


__all__ = ["Redactor", "INPUT", "WITHHELD"]
