"""The organ registry (configs/<organ>.yaml -> dicompipe.organs.Organ) and its consumers."""
from __future__ import annotations

import dataclasses

import pytest

from dicompipe import organs
from dicompipe.errors import DicompipeError, UnreadableSeries, UnsupportedInput


def test_builtin_organs_load_and_validate():
    assert organs.names() == ("lung", "pancreas")
    lung, pancreas = organs.get("lung"), organs.get("pancreas")
    assert lung.model == "lung-resnet50" and pancreas.model == "pancreas-resnet50"
    assert lung.min_slices == 1 and pancreas.min_slices == 1
    assert "CHEST" in lung.header_words and "ABDOMEN" in pancreas.header_words
    assert lung.lung_air_above == 0.15 and pancreas.lung_air_at_most == 0.15
    assert lung.display_window == (-600.0, 1500.0) and pancreas.display_window == (40.0, 400.0)
    assert (lung.body_part, pancreas.body_part) == ("CHEST", "ABDOMEN")
    assert lung.finding_site == organs.Code("39607008", "SCT", "Lung")
    assert pancreas.training.labels == ("normal", "tumour")
    with pytest.raises(UnsupportedInput, match="Unknown organ 'liver'"):
        organs.get("liver")
    assert organs.find("liver") is None


def test_selection_rules_are_the_former_defaults():
    # the values preprocess.selection.DEFAULTS held before the registry
    assert organs.get("lung").selection.rules() == {
        "body_hu": -500, "min_body_fraction": 0.05, "lung_air_hu": (-950, -400),
        "min_lung_fraction": 0.02, "soft_tissue_hu": (-100, 200)}
    assert organs.get("pancreas").selection.rules() == {
        "body_hu": -500, "min_body_fraction": 0.05, "max_lung_fraction": 0.25,
        "min_soft_tissue_fraction": 0.30, "soft_tissue_hu": (-100, 200),
        "lung_air_hu": (-950, -400)}


def test_one_display_window_for_report_and_app():
    """The app's default window for an organ is the report's (pancreas was 50/350 vs 40/400)."""
    views = pytest.importorskip("dicompipe.ui.views")
    from analysis_factory import make_analysis

    from dicompipe.report.figures import display_window
    for name in organs.names():
        a = make_analysis(organ=name, n_z=4, lesion_z=(2,), k=2)
        assert views.WINDOWS[views.DEFAULT_WINDOW[name]] == display_window(a)
        assert display_window(a) == organs.get(name).display_window


def test_user_config_over_builtin(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("slice_selection:\n  min_lung_fraction: 0.1\naggregation:\n  rule: max\n")
    o = organs.load("lung", p)
    assert o.selection.min_lung_fraction == 0.1 and o.selection.body_hu == -500
    assert o.aggregation.overrides() == {"rule": "max"} and o.model == "lung-resnet50"
    p.write_text("organ: pancreas\n")
    with pytest.raises(DicompipeError, match="describes organ 'pancreas', not 'lung'"):
        organs.load("lung", p)
    p.write_text("aggregation:\n  rule: median\n")
    with pytest.raises(DicompipeError, match="aggregation.rule 'median'"):
        organs.load("lung", p)
    p.write_text("slice_selection:\n  min_lung_fraktion: 0.1\n")
    with pytest.raises(DicompipeError, match="unknown slice_selection keys"):
        organs.load("lung", p)
    p.write_text("series:\n  min_slices: 0\n")
    with pytest.raises(DicompipeError, match="min_slices must be >= 1"):
        organs.load("lung", p)
    assert organs.get("lung").evidence_region == "lung_fields" and organs.get("pancreas").evidence_region is None
    p.write_text("evidence_region: null\n")
    assert organs.load("lung", p).evidence_region is None
    p.write_text("evidence_region: liver\n")
    with pytest.raises(DicompipeError, match="evidence_region 'liver' is not one of lung_fields"):
        organs.load("lung", p)
    with pytest.raises(DicompipeError, match="Cannot read pipeline config"):
        organs.load("lung", tmp_path / "missing.yaml")


def test_min_slices_is_enforced():
    from types import SimpleNamespace

    from dicompipe.pipeline import _check_slices
    vol = SimpleNamespace(shape=(3, 8, 8), series=SimpleNamespace(key="s1", source="in/"))
    _check_slices(vol, organs.get("lung"))                       # 3 >= 1: fine
    strict = dataclasses.replace(organs.get("lung"), min_slices=4)
    with pytest.raises(UnreadableSeries, match="need at least 4"):
        _check_slices(vol, strict)


def test_cli_choices_come_from_the_registry():
    from dicompipe.cli import build_parser
    p = build_parser()
    assert p.parse_args(["analyze", "x", "--organ", "pancreas"]).organ == "pancreas"
    with pytest.raises(SystemExit):
        p.parse_args(["analyze", "x", "--organ", "liver"])
