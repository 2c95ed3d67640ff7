"""Command-line details a newcomer meets first (issue 16)."""
import subprocess
import sys

import pytest
from synth import write_ct_series, write_png_slices

from dicompipe import pipeline
from dicompipe.cli import build_parser, main


def test_series_json_piped_into_head_ends_without_a_traceback(tmp_path):
    write_ct_series(tmp_path / "ct", shape=(40, 16, 20))
    # `true` leaves at once, so the write meets a closed pipe (`| head` on a long listing)
    cmd = f"{sys.executable} -m dicompipe.cli series {tmp_path} --json | true"
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr


def test_ui_help_names_port_and_host_defaults():
    sub = next(a for a in build_parser()._actions if a.dest == "command" or a.choices)
    text = sub.choices["ui"].format_help()
    assert "default 8501" in text and "default localhost" in text


def test_spacing_of_image_slices_from_the_command_line(tmp_path, monkeypatch):
    write_png_slices(tmp_path / "lung", n=3)
    seen = {}

    def fake_analyze(path, **kw):                   # stop after the load: no model needed
        vol = pipeline.io.load(pipeline.io.select(pipeline.io.discover(path)), spacing=kw["spacing"])
        seen["spacing"] = vol.image.GetSpacing()
        raise pipeline.UnsupportedInput("stop here")
    monkeypatch.setattr(pipeline, "analyze", fake_analyze)
    assert main(["analyze", str(tmp_path / "lung"), "--organ", "lung", "--spacing", "0.7,0.7,2.5",
                 "--no-history", "--quiet", "--out", str(tmp_path / "runs")]) == 2
    assert seen["spacing"] == (0.7, 0.7, 2.5)
    with pytest.raises(SystemExit):
        main(["analyze", "x", "--spacing", "0.7,-1"])


@pytest.mark.parametrize("extra, message", [
    (["--real-share", "1"], "--real-share 1 is not in [0, 1)"),
    (["--abnormal-top", "1.5"], "--abnormal-top 1.5 is not in [0, 1)"),
    (["--phases", "pretrain:40"], "is not NAME:MINUTES:SIZE"),
    ([], "--pretrain needs --split-file"),
])
def test_lesion_training_options_are_checked_before_any_work(tmp_path, capsys, extra, message):
    assert main(["train", str(tmp_path), "--organ", "lung", "--out", str(tmp_path / "b"),
                 "--pretrain", "synthetic-lesions", *extra]) == 2
    assert message in capsys.readouterr().err


def test_input_region_is_refused_for_the_pancreas_before_any_work(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--organ", "pancreas", "--out", str(tmp_path / "b"),
                 "--pretrain", "synthetic-lesions", "--input-region", "lung_fields"]) == 2
    assert "--input-region lung_fields is for the lung only" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--organ", "pancreas"], ["--organ", "lung", "--input-region", "lung_fields"],
                                   ["--organ", "lung", "--region-dropout", "1.5"]])
def test_region_dropout_is_refused_where_it_means_nothing(tmp_path, capsys, extra):
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "b"), "--pretrain",
                 "synthetic-lesions", "--region-dropout", "0.5", *extra]) == 2   # the last one counts
    assert "--region-dropout" in capsys.readouterr().err


def test_train_needs_out_unless_no_bundle(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--organ", "lung"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--organ", "lung", "--no-bundle"]) == 2   # 1.x trainer
    assert "needs --out" in capsys.readouterr().err


def test_train_extra_normals_repeated_keeps_every_series():
    """Repeating --extra-normals adds series; argparse's default would keep only the last."""
    args = build_parser().parse_args(["train", "data", "--organ", "lung", "--extra-normals", "a",
                                      "--extra-normals", "b", "c"])
    assert args.extra_normals == ["a", "b", "c"]
