"""Choose the series to analyse, and say why (and why not the others).

Preference, in order: usable volumes only (no localizer, SR, SC, RT, non-image), CT
modality, at least ``min_slices`` slices, DICOM before PNG/JPG or NIfTI, complete series
(at least ``PARTIAL_SLICES`` slices or half the z extent of the longest candidate) before
partial ones, ORIGINAL/PRIMARY before derived, axial before other orientations, then the thinnest
slices, then the most slices. A user can force a series by SeriesInstanceUID, series number or key.

Example::

    >>> chosen = select(discover("study/"))
    >>> chosen.reason
    'CT ORIGINAL/PRIMARY axial, 1.25 mm, 240 slices: thinnest, then most slices, of 3 usable series'
"""
from __future__ import annotations

from dicompipe.errors import NoSeriesFound
from dicompipe.types import SeriesInfo


def describe(s: SeriesInfo) -> str:
    """One-line description of a candidate for messages and tables."""
    bits = [s.key, s.kind if s.kind != "dicom" else (s.modality or "?")]
    if s.series_description:
        bits.append(repr(s.series_description))
    bits.append(f"{s.n_instances} slice(s)")
    if s.orientation:
        bits.append(s.orientation)
    if not s.usable:
        bits.append(f"unusable: {s.unusable_reason}")
    return " ".join(bits)


def _thickness(s: SeriesInfo) -> float:
    """SliceThickness, else the median slice spacing, else infinity."""
    st = s.spacing_stats.get("median") if s.spacing_stats else None
    return s.slice_thickness or st or float("inf")


def _is_original(s: SeriesInfo) -> bool:
    it = s.image_type
    return not it or (it[0] == "ORIGINAL" and (len(it) < 2 or it[1] == "PRIMARY"))


#: a series with fewer slices than this that also covers less than half the z extent of
#: the longest candidate is a partial series: a few thin slices or a fragment must not beat
#: the complete volume
PARTIAL_SLICES = 10


def _extent(s: SeriesInfo) -> float:
    """z coverage in mm (slices × thickness; slices alone when the thickness is unknown)."""
    th = _thickness(s)
    return s.n_instances * (th if th != float("inf") else 1.0)


def _rank(s: SeriesInfo, longest: tuple = (0, 0.0)) -> tuple:
    """Sort key; ``longest`` = (most slices, largest z extent) of the eligible candidates."""
    partial = s.n_instances < min(PARTIAL_SLICES, longest[0]) and _extent(s) < 0.5 * longest[1]
    return (s.kind != "dicom", partial, not _is_original(s), s.orientation not in ("axial", None),
            _thickness(s), -s.n_instances, s.key)


def _summary(s: SeriesInfo) -> str:
    kind = s.modality or s.kind
    it = "ORIGINAL/PRIMARY" if _is_original(s) and s.image_type else "/".join(s.image_type[:2]) or ""
    th = _thickness(s)
    return " ".join(filter(None, [kind, it, s.orientation or "",
                                  f"{th:g} mm" if th != float("inf") else "",
                                  f"{s.n_instances} slice(s)"]))


def _matches(s: SeriesInfo, want) -> bool:
    if isinstance(want, SeriesInfo):
        return s is want or s.key == want.key
    w = str(want).strip()
    if w in (s.key, s.series_instance_uid):
        return True
    try:
        return s.series_number is not None and int(w) == s.series_number
    except ValueError:
        return False


def select(candidates: list[SeriesInfo], series=None, *, min_slices: int = 1,
           modality: str | None = "CT") -> SeriesInfo:
    """Pick the series to analyse; fill ``.reason`` on it ("why") and on the others ("why not").

    ``series``: force a SeriesInstanceUID, series number or key (a ``SeriesInfo`` works too).
    ``min_slices``: fewer slices than this rule a series out. ``modality``: required DICOM
    modality ("CT"; None accepts any). Raises :class:`NoSeriesFound` listing what was found.

    Example::

        >>> chosen = select(found, series="3")       # SeriesNumber 3, or a UID, or a key
        >>> chosen.reason, [s.reason for s in found if s is not chosen]
    """
    cands = list(candidates)
    found = "; ".join(describe(s) for s in cands) or "nothing"
    extra = getattr(candidates, "skipped_summary", "")
    where = getattr(candidates, "source", None) or (cands[0].source if cands else "the input")
    if series is not None:
        hits = [s for s in cands if _matches(s, series)]
        if not hits:
            raise NoSeriesFound(f"No series {series!r} under {where}. Found: {found}. "
                                "Use a SeriesInstanceUID, series number or key from `dicompipe series`.")
        usable = [s for s in hits if s.usable]
        if not usable:
            raise NoSeriesFound(f"Series {series!r} under {where} is not a usable volume: "
                                f"{hits[0].unusable_reason}. Found: {found}.")
        chosen = min(usable, key=_rank)           # no partial-series rule when forced
        chosen.reason = f"forced by the user ({series if not isinstance(series, SeriesInfo) else series.key})"
        for s in cands:
            if s is not chosen:
                s.reason = "not chosen: another series was forced"
        return chosen

    why_not: dict[int, str] = {}
    eligible = []
    for s in cands:
        if not s.usable:
            why_not[id(s)] = f"not a usable volume: {s.unusable_reason}"
        elif modality and s.kind == "dicom" and (s.modality or "").upper() != modality.upper():
            why_not[id(s)] = f"modality {s.modality or 'missing'}, not {modality}"
        elif s.n_instances < min_slices:
            why_not[id(s)] = f"{s.n_instances} slice(s), fewer than the required {min_slices}"
        else:
            eligible.append(s)
    if not eligible:
        details = "; ".join(f"{s.key}: {why_not[id(s)]}" for s in cands) or "no DICOM, image or NIfTI file"
        raise NoSeriesFound(
            f"No usable {modality + ' ' if modality else ''}series under {where}: {details}"
            f"{'. ' + extra if extra else ''}. Point dicompipe at the folder of the CT export, or "
            "force a series with --series.")
    longest = (max(s.n_instances for s in eligible), max(_extent(s) for s in eligible))
    eligible.sort(key=lambda s: _rank(s, longest))
    chosen = eligible[0]
    ties = [s for s in eligible if s.kind == "images" and _rank(s, longest)[:-1] == _rank(chosen, longest)[:-1]]
    if chosen.kind == "images" and len(ties) > 1:
        # image folders carry no header to rank them: two equal ones are two cases, not one
        listed = "; ".join(f"{s.key}: {s.series_description}" for s in ties)
        raise NoSeriesFound(f"{len(ties)} image folders under {where} are equally good candidates "
                            f"({listed}): give one folder, or choose with --series KEY.")
    criteria = (f"DICOM before image slices, at least {PARTIAL_SLICES} slices, ORIGINAL/PRIMARY, "
                "axial, thinnest, then most slices")
    chosen.reason = (f"{_summary(chosen)}: the only usable series" if len(eligible) == 1 else
                     f"{_summary(chosen)}: best of {len(eligible)} usable series ({criteria})")
    for s in eligible[1:]:
        why_not[id(s)] = _why_not(s, chosen, longest)
    for s in cands:
        if s is not chosen:
            s.reason = "not chosen: " + why_not[id(s)]
    return chosen


def _why_not(s: SeriesInfo, chosen: SeriesInfo, longest: tuple = (0, 0.0)) -> str:
    a, b = _rank(s, longest), _rank(chosen, longest)
    names = ["not DICOM (image slices or NIfTI rank after DICOM)",
             f"partial series: {s.n_instances} slice(s) covering {_extent(s):g} mm, fewer than "
             f"{PARTIAL_SLICES} slices and under half the longest series' extent",
             "derived/secondary image", f"{s.orientation} rather than axial"]
    for i, why in enumerate(names):
        if a[i] != b[i]:
            return why
    if a[4] != b[4]:
        return f"thicker slices ({a[4]:g} mm vs {b[4]:g} mm)"
    if a[5] != b[5]:
        return f"fewer slices ({s.n_instances} vs {chosen.n_instances})"
    return f"equal rank; {chosen.key} comes first by key"
