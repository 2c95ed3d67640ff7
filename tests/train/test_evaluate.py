"""`evaluate` on a tiny synthetic tree with a tiny untrained-but-saved bundle (issue 6)."""
import json

import numpy as np
import pytest
from test_train import make_tree

from dicompipe.train import splits as S
from dicompipe.train.evaluate import evaluate, knn_probe


def test_knn_probe_sees_leakage():
    rng = np.random.default_rng(0)
    base = rng.random((10, 16, 16)) * 255                 # 10 "patients"
    imgs = np.concatenate([base + rng.normal(0, 3, base.shape) for _ in range(6)])  # 6 slices each
    y = np.tile(rng.integers(0, 2, 10), 6)
    groups = np.tile(np.arange(10), 6)
    honest = S.group_split(groups, y, (0.6, 0.2, 0.2), seed=0)
    naive = S.naive_split(y, (0.6, 0.2, 0.2), seed=0)
    assert knn_probe(imgs, y, naive)["accuracy"] > 0.95   # neighbours of the same patient
    assert knn_probe(imgs, y, honest)["n_test"] > 0


@pytest.mark.slow
def test_evaluate_writes_metrics_and_figures(tmp_path):
    from dicompipe.model.bundle import save_bundle
    from dicompipe.model.network import resnet50
    from dicompipe.types import PreprocessSpec
    make_tree(tmp_path / "d", n=10)
    save_bundle(tmp_path / "b", resnet50(3), {
        "name": "t", "organ": "lung", "labels": ["normal", "benign", "malignant"], "trained": True,
        "preprocessing": PreprocessSpec(size=32), "calibration": {"temperature": 1.5}})
    res = evaluate(tmp_path / "d", str(tmp_path / "b"), tmp_path / "e", n_boot=20,
                   workdir=tmp_path / "w", log=lambda *_: None)
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["temperature"] == 1.5
    for key in ("leak_free_test", "subset_512_test", "naive_split"):
        assert key in m
    assert "macro_auroc" in m["leak_free_test"] and "ece_uncalibrated" in m["leak_free_test"]
    for f in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (tmp_path / "e" / f).stat().st_size > 1000
    assert res["counts"]["test"]["malignant"] > 0
