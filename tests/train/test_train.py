"""Training on a tiny synthetic class-folder tree (model stage, issue 6). Seconds, no real data."""
import json

import numpy as np
import pytest
from PIL import Image

from dicompipe.preprocess.render import render
from dicompipe.train.calibration import fit_temperature
from dicompipe.train.metrics import auroc, classification_metrics, ece, ece_noise_floor
from dicompipe.types import PreprocessSpec, softmax


def make_tree(root, n=10, wide_malignant=True):
    """IQ-OTH/NCCD-like tree: 'Bengin cases' spelling, numbered files, a wider malignant export."""
    rng = np.random.default_rng(0)
    folders = {"Normal cases": ("Normal case", 0), "Bengin cases": ("Bengin case", 1),
               "Malignant cases": ("Malignant case", 2)}
    for folder, (stem, k) in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(1, n + 1):
            w = 96 if (k == 2 and wide_malignant and i % 3 == 0) else 64
            a = (rng.random((64, w)) * 40).astype(np.uint8)
            a[20:44, 20:44] = 80 + 60 * k + i           # class-dependent blob
            Image.fromarray(a).save(root / folder / f"{stem} ({i}).jpg")
    return root


def test_scan_label_map_and_numbers(tmp_path):
    from dicompipe.train import data as D  # imports torch: here, not at collection

    make_tree(tmp_path / "d", n=3)
    items, labels = D.scan(tmp_path / "d", "lung")
    assert labels == ["normal", "benign", "malignant"]
    assert sorted({labels[i.label] for i in items}) == sorted(labels)
    assert {i.number for i in items} == {1, 2, 3}
    lm = D.parse_label_map("Normal cases=benign")
    items2, _ = D.scan(tmp_path / "d", "lung", lm)
    assert sum(i.label == 1 for i in items2) == 6


def test_cache_is_the_inference_renderer(tmp_path):
    import torch

    from dicompipe.train import data as D

    make_tree(tmp_path / "d", n=3)
    items, _ = D.scan(tmp_path / "d", "lung")
    spec = PreprocessSpec(size=32)
    cache = D.build_cache(items, spec, tmp_path / "c.npz", log=None)
    a, windowed, _ = D.read_gray(items[0].path)
    ref = render(a, spec, windowed=windowed)
    back = D.to_input(torch.from_numpy(cache[:1]), spec)[0].numpy()
    assert np.abs(back - ref).max() < 0.02            # uint8 rounding only
    again = D.build_cache(items, spec, tmp_path / "c.npz", log=None)   # from the cache file
    assert np.array_equal(cache, again)
    wide = [i for i in items if i.shape[1] == 96]
    assert wide and all(i.shape == (64, 96) for i in wide)


def test_augment_shapes_and_range():
    import torch

    from dicompipe.train import data as D

    spec = PreprocessSpec(size=32)
    u8 = torch.randint(0, 255, (4, 48, 48), dtype=torch.uint8)
    x = D.Augment(flip=True, seed=1)(u8, spec, 32)
    assert x.shape == (4, 3, 32, 32)
    lo, hi = (0 - spec.mean) / spec.std, (1 - spec.mean) / spec.std
    assert x.min() >= lo - 1e-5 and x.max() <= hi + 1e-5


def test_metrics_and_temperature():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    z = rng.normal(0, 1, (3000, 3))
    z[np.arange(3000), y] += 2.0
    # unit-variance Gaussian scores shifted by 2: the true log-odds are 2 z, so 3 z is
    # over-confident by a factor 1.5
    T = fit_temperature(z * 3.0, y)
    assert 1.35 < T < 1.65
    assert ece(y, softmax(z * 3.0 / T, np.float64)) < ece(y, softmax(z * 3.0, np.float64))
    m = classification_metrics(y, softmax(z, np.float64), ["a", "b", "c"], n_boot=50)
    assert m["macro_auroc_ci95"][0] <= m["macro_auroc"] <= m["macro_auroc_ci95"][1]
    assert {"sensitivity_a", "specificity_c", "balanced_accuracy", "ece"} <= set(m)


def test_ece_noise_floor_is_what_a_calibrated_model_shows_by_chance():
    """Labels drawn from the probabilities themselves: a calibrated model. Its ECE shrinks
    with n, and on 199 cases sits near the floor's median, not at 0."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet([2, 2, 2], 4000)
    y = (rng.random((4000, 1)) > np.cumsum(p, 1)).sum(1)
    small, big = ece_noise_floor(p[:199], draws=200), ece_noise_floor(p, draws=50)
    assert 0.03 < small["median"] < small["p95"] < 0.2 and big["median"] < small["median"] / 3
    assert ece(y[:199], p[:199]) < small["p95"] and ece(y, p) < big["p95"]
    m = classification_metrics(y[:199], p[:199], ["a", "b", "c"], n_boot=10)
    assert m["ece_noise_floor"]["median"] > 0


@pytest.mark.slow
def test_train_bundle_writes_a_loadable_bundle(tmp_path):
    from dicompipe.model.bundle import load_bundle
    from dicompipe.train.train import train_bundle
    make_tree(tmp_path / "d", n=10)
    kw = dict(sizes="32x1", seed=0, workdir=tmp_path / "w" / "lung", threads=1, size=32)
    assert train_bundle(tmp_path / "d", "lung", tmp_path / "b", **kw) == tmp_path / "b"
    b = load_bundle(tmp_path / "b", organ="lung")
    md = b.metadata
    assert md["trained"] and md["labels"] == ["normal", "benign", "malignant"]
    assert md["calibration"]["temperature"] > 0
    assert md["preprocessing"]["size"] == 32
    assert md["training"]["split"]["counts"]["test"]["malignant"] > 0
    split = json.loads((tmp_path / "b" / "docs" / "split.json").read_text())["parts"]
    assert set(split.values()) <= {"train", "val", "test", None}
    # resume: nothing left to do, the same bundle comes out
    assert train_bundle(tmp_path / "d", "lung", tmp_path / "b", resume=True, **kw) == tmp_path / "b"
