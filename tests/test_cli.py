"""Command-line details a newcomer meets first (issue 16)."""
import subprocess
import sys

from synth import write_ct_series

from dicompipe.cli import build_parser


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
