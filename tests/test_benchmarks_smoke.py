"""Smoke test of the benchmark suite: ``python -m benchmarks --tiny`` runs every section on
toy sizes (8 slices of 64x64, 64 px model inputs) and writes its JSON. The numbers mean
nothing; this only proves the one-command suite works (with or without onnxruntime)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmarks_tiny(tmp_path):
    out = tmp_path / "tiny.json"
    work = tmp_path / "work"                      # nothing left behind in benchmarks/_work
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DICOMPIPE_BENCH_WORK": str(work)})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tiny"] and res["machine"]["id"].startswith("cpu-")
    assert res["sgemm"]["gflops"]["median"] > 0
    for name in ("load", "model", "cam", "e2e", "overlap"):
        assert name in res and "error" not in res[name], (name, res.get(name))
    backends = {r["backend"] for r in res["model"]["rows"]}
    assert {"torch-eager", "torch"} <= backends
    assert all(r["slices_per_s"]["median"] > 0 for r in res["model"]["rows"])
    assert res["cam"]["timings"]["forward+cam"]["median_s"] > 0
    (run,) = res["e2e"]["analyze"].values()
    assert "error" not in run and run["peak_rss_mb"]["max"] > 0 and run["slices"] > 0
    assert "TOTAL analyze()" in p.stdout                 # the one table was printed
    assert work.is_dir()                                # its scratch went where it was told


@pytest.mark.slow
def test_train_speed_compares_fp32_and_bf16(tmp_path):
    from benchmarks import train_speed
    res = train_speed.main(["--repeats", "1", "--batch", "2", "--size", "64",
                            "--out", str(tmp_path / "t.json")])
    assert set(res["img_per_s"]) == {"fp32", "bf16"}
    assert all(r["median"] > 0 for r in res["img_per_s"].values()) and res["bf16_speedup"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["size"] == 64


def test_evidence_heads_fit_what_they_can_express():
    """benchmarks.evidence_head: an evidence head fitted on labels made from the CAM mass
    separates them; the malignant-evidence head keeps the other classes' logits' order."""
    import numpy as np

    from benchmarks.evidence_head import fit_head, head_logits
    rng = np.random.default_rng(0)
    mass = rng.gamma(2.0, 1.0, (600, 3))
    logits = rng.normal(0, 1, (600, 3))
    y = mass.argmax(1)                                 # each slice's class: its largest mass
    p = fit_head("evidence", logits, mass, y, mal=2)
    assert (head_logits("evidence", p, logits, mass, 2).argmax(1) == y).mean() > 0.9
    assert (head_logits("bundle", np.zeros(0), logits, mass, 2) == logits).all()
    q = fit_head("malignant evidence", logits, mass, y, mal=2)
    z = head_logits("malignant evidence", q, logits, mass, 2)
    assert np.array_equal(np.argsort(z[:, 0]), np.argsort(logits[:, 0]))
    assert np.corrcoef(z[:, 2], mass[:, 2])[0, 1] > 0.999
