"""The organ registry: ``dicompipe/configs/<organ>.yaml`` read into checked, frozen dataclasses.

Everything dicompipe knows about an organ lives in its YAML file: the default model bundle,
the header words and lung-air rule that pick it for ``--organ auto``, the slice-selection
rules, aggregation overrides, the reading window of the report images and the app, the
DICOM codes of the SR and Secondary Capture outputs, and the training recipe's labels.
Adding an organ is one YAML file plus a model bundle (see docs/architecture.md).
Organs are listed in file-name order, which is also the order ``--organ auto`` tries them.

Example::

    >>> from dicompipe import organs
    >>> organs.names()
    ('lung', 'pancreas')
    >>> organs.get("pancreas").display.level, organs.get("pancreas").display.width
    (40.0, 400.0)
    >>> organs.load("lung", "my-lung.yaml").model        # a user file over the built-in one
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dicompipe.errors import DicompipeError, UnsupportedInput

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
AGGREGATION_RULES = ("topk_mean", "max", "mean", "noisy_or")
EVIDENCE_REGIONS = ("lung_fields",)


@dataclass(frozen=True)
class Selection:
    """Slice-selection rules (HU input only): a slice is skipped when its body is under
    ``min_body_fraction`` of the slice, or a set rule on lung air / soft tissue (fractions
    of the body) fails. Unset (None) rules are not applied."""

    enabled: bool = True
    body_hu: float = -500
    min_body_fraction: float = 0.05
    lung_air_hu: tuple[float, float] = (-950, -400)
    min_lung_fraction: float | None = None
    max_lung_fraction: float | None = None
    min_soft_tissue_fraction: float | None = None
    soft_tissue_hu: tuple[float, float] = (-100, 200)

    def rules(self) -> dict[str, Any]:
        """The rules as the plain dict :func:`dicompipe.preprocess.selection.skip_reasons`
        takes (unset rules left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "enabled" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Aggregation:
    """Overrides of the bundle's aggregation defaults (None keeps the bundle's)."""

    rule: str | None = None
    k: int | None = None
    uncertain_band: tuple[float, float] | None = None

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Window:
    """A reading window in HU and the app's name for it."""

    name: str
    level: float
    width: float


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM SR): value, scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Training:
    """What ``dicompipe train``/``evaluate`` need (1.x recipe): class labels (the negative
    class first), the positive ones, HU windows for DICOM input, flip augmentation, and the
    training data's citation for the model card."""

    labels: tuple[str, ...]
    positive: tuple[str, ...]
    windows: tuple[tuple[float, float], ...]
    flip: bool = False
    citation: str = ""


@dataclass(frozen=True)
class Organ:
    """One organ's settings (``configs/<name>.yaml``)."""

    name: str                                  # "lung"
    title: str                                 # "Lung" (the app)
    model: str                                 # default bundle: built-in name or folder
    min_slices: int
    header_words: tuple[str, ...]              # --organ auto: header hints
    lung_air_above: float | None               # --organ auto without hint: this organ when
    lung_air_at_most: float | None             #   the median lung-air fraction is > / <= this
    selection: Selection
    aggregation: Aggregation
    display: Window
    body_part: str                             # BodyPartExamined of the SC series
    finding_site: Code                         # SR finding site
    training: Training
    source: Path                               # the YAML file(s) it was read from
    evidence_region: str | None = None         # "lung_fields": rank slices by evidence inside

    @property
    def display_window(self) -> tuple[float, float]:
        """(level, width) of the report images and the app's default window."""
        return (self.display.level, self.display.width)


# --------------------------------------------------------------------------- loading
def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise DicompipeError(f"Cannot read pipeline config {path}: {e.strerror}.") from e
    except yaml.YAMLError as e:
        raise DicompipeError(f"Pipeline config {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DicompipeError(f"Pipeline config {path} must be a mapping of settings.")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _num(v, what: str, where: Path):
    """A number as written (an int stays an int: skip reasons print it), or None."""
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return v
    raise DicompipeError(f"{where}: {what} must be a number, got {v!r}.")


def _pair(v, what: str, where: Path) -> tuple:
    if not (isinstance(v, (list, tuple)) and len(v) == 2):
        raise DicompipeError(f"{where}: {what} must be a pair of numbers, got {v!r}.")
    return (_num(v[0], what, where), _num(v[1], what, where))


def _parse(name: str, d: dict, where: Path) -> Organ:
    def need(section: dict, key: str, ctx: str):
        if key not in section or section[key] is None:
            raise DicompipeError(f"{where}: {ctx}{key} is missing.")
        return section[key]

    def section(key: str) -> dict:
        v = d.get(key) or {}
        if not isinstance(v, dict):
            raise DicompipeError(f"{where}: {key} must be a mapping.")
        return v

    if d.get("organ", name) != name:
        raise DicompipeError(f"{where} describes organ {d.get('organ')!r}, not {name!r}.")
    try:
        auto, sel, agg = section("auto"), section("slice_selection"), section("aggregation")
        disp, dcm, tr = section("display"), section("dicom"), section("training")
        fields = {f.name for f in dataclasses.fields(Selection)}
        unknown = set(sel) - fields
        if unknown:
            raise DicompipeError(f"{where}: unknown slice_selection keys {sorted(unknown)}.")
        selection = Selection(**{k: (bool(v) if k == "enabled" else
                                     _pair(v, k, where) if k.endswith("_hu") and k != "body_hu"
                                     else _num(v, f"slice_selection.{k}", where))
                                 for k, v in sel.items()})
        rule = agg.get("rule")
        if rule is not None and rule not in AGGREGATION_RULES:
            raise DicompipeError(f"{where}: aggregation.rule {rule!r} is not one of "
                                 f"{', '.join(AGGREGATION_RULES)}.")
        band = agg.get("uncertain_band")
        aggregation = Aggregation(rule=rule, k=None if agg.get("k") is None else int(agg["k"]),
                                  uncertain_band=None if band is None
                                  else _pair(band, "aggregation.uncertain_band", where))
        code = need(dcm, "finding_site", "dicom.")
        if not (isinstance(code, (list, tuple)) and len(code) == 3):
            raise DicompipeError(f"{where}: dicom.finding_site must be [value, scheme, meaning].")
        labels = tuple(str(x) for x in need(tr, "labels", "training."))
        positive = tuple(str(x) for x in need(tr, "positive", "training."))
        if not set(positive) <= set(labels):
            raise DicompipeError(f"{where}: training.positive {list(positive)} not among the "
                                 f"labels {list(labels)}.")
        region = d.get("evidence_region")
        if region not in (None, *EVIDENCE_REGIONS):
            raise DicompipeError(f"{where}: evidence_region {region!r} is not one of "
                                 f"{', '.join(EVIDENCE_REGIONS)} (or null).")
        min_slices = int((d.get("series") or {}).get("min_slices", 1))
        if min_slices < 1:
            raise DicompipeError(f"{where}: series.min_slices must be >= 1, got {min_slices}.")
        return Organ(
            name=name, title=str(d.get("name") or name.title()), model=str(need(d, "model", "")),
            min_slices=min_slices,
            header_words=tuple(str(w).upper() for w in auto.get("header_words") or ()),
            lung_air_above=None if auto.get("lung_air_above") is None
            else float(auto["lung_air_above"]),
            lung_air_at_most=None if auto.get("lung_air_at_most") is None
            else float(auto["lung_air_at_most"]),
            selection=selection, aggregation=aggregation,
            display=Window(str(disp.get("window") or name.title()),
                           float(need(disp, "level", "display.")),
                           float(need(disp, "width", "display."))),
            body_part=str(need(dcm, "body_part", "dicom.")),
            finding_site=Code(str(code[0]), str(code[1]), str(code[2])),
            training=Training(labels=labels, positive=positive,
                              windows=tuple(_pair(w, "training.windows", where)
                                            for w in need(tr, "windows", "training.")),
                              flip=bool(tr.get("flip", False)),
                              citation=str(tr.get("citation") or "")),
            source=where, evidence_region=region)
    except (TypeError, ValueError) as e:
        raise DicompipeError(f"{where}: {e}") from e


@functools.cache
def _builtin(name: str) -> Organ:
    path = CONFIG_DIR / f"{name}.yaml"
    return _parse(name, _read(path), path)


def names() -> tuple[str, ...]:
    """The organs dicompipe knows, in file-name order."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


def get(name: str) -> Organ:
    """The built-in settings of organ ``name``; :class:`UnsupportedInput` for an unknown one."""
    if name not in names():
        raise UnsupportedInput(
            f"Unknown organ {name!r}: choose one of {', '.join(names())} or 'auto'.")
    return _builtin(name)


def find(name: str | None) -> Organ | None:
    """:func:`get`, or None for an unknown organ (or None)."""
    return _builtin(name) if name in names() else None


def all_organs() -> tuple[Organ, ...]:
    return tuple(get(n) for n in names())


def load(name: str, path: str | Path | None = None) -> Organ:
    """Organ ``name``'s settings; with ``path``, that YAML file over the built-in one (a
    partial file changes only what it sets; its ``organ:``, if any, must be ``name``)."""
    base = get(name)
    if not path:
        return base
    p = Path(path)
    return _parse(name, _merge(_read(base.source), _read(p)), p)
