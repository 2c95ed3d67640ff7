"""model.ood: the out-of-distribution score on synthetic features (fires on noise and shifted
distributions, not on held-out in-distribution samples), its bundle file (safetensors +
sha256-checked metadata entry) and bundles without one."""
import json

import numpy as np
import pytest
from tiny_bundle import make_bundle

from dicompipe.errors import ModelError
from dicompipe.model import load_bundle
from dicompipe.model.ood import METHOD, NOT_AVAILABLE, OOD_FILE, check, fit_ood, pooled, save_ood

C, K, RANK = 256, 3, 12


class Source:
    """Features like pooled layer4 vectors: non-negative, per-class means, low-rank spread."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.means = np.abs(rng.normal(1.0, 0.4, (K, C)))
        self.basis = rng.normal(0, 1, (RANK, C)) / np.sqrt(RANK)
        self.rng = np.random.default_rng(seed + 1)

    def sample(self, n, k=None):
        ks = self.rng.integers(0, K, n) if k is None else np.full(n, k)
        x = self.means[ks] + 0.3 * self.rng.normal(size=(n, RANK)) @ self.basis
        x += 0.05 * self.rng.normal(size=(n, C))
        return np.maximum(x, 0), ks


@pytest.fixture(scope="module")
def src():
    return Source()


@pytest.fixture(scope="module")
def model(src):
    x, y = src.sample(600)
    xv, _ = src.sample(200)
    return fit_ood(x, y, val_features=xv, n_components=32)


def test_threshold_is_the_validation_quantile(model):
    assert model.n_components == 32 and model.quantile == 0.95
    assert model.validation["n"] == 200
    assert model.validation["false_refusal_rate"] <= 0.05
    assert model.class_means.shape == (K, C) and model.components.shape == (32, C)
    assert model.class_means.dtype == np.float32


def test_held_out_in_distribution_samples_pass(src, model):
    x, _ = src.sample(1000)
    assert np.mean(model.score(x) > model.slice_threshold) < 0.09     # ~5 % by construction
    for k in range(K):                                                  # no class singled out
        xk, _ = src.sample(200, k)
        assert np.mean(model.score(xk) > model.slice_threshold) < 0.12
    c = model.check(src.sample(20)[0])
    assert c.available and not c.out_of_distribution and len(c.scores) == 20


@pytest.mark.parametrize("kind", ["noise", "uniform", "shift", "scaled", "other_means", "zeros"])
def test_unlike_inputs_fire(src, model, kind):
    rng = np.random.default_rng(7)
    x, _ = src.sample(50)
    bad = {"noise": np.abs(rng.normal(0, 1, (50, C))),
           "uniform": rng.uniform(0, 2, (50, C)),
           "shift": x + 0.25,                                   # a shifted distribution
           "scaled": x * 1.6,                                   # contrast change
           "other_means": Source(seed=99).sample(50)[0],        # another "data set"
           "zeros": np.zeros((50, C))}[kind]
    s = model.score(bad)
    assert np.mean(s > model.slice_threshold) > 0.95
    assert model.check(bad).out_of_distribution


def test_volume_rule_is_more_than_half(src, model):
    good, _ = src.sample(10)
    noise = np.abs(np.random.default_rng(3).normal(0, 1, (10, C)))
    half = np.vstack([good[:5], noise[:5]])
    c = model.check(half)
    assert len(c.out_rows) >= 5 and set(range(5, 10)) <= set(c.out_rows)
    assert c.out_of_distribution is (len(c.out_rows) > 5)
    most = model.check(np.vstack([good[:3], noise[:7]]))
    assert most.out_of_distribution and "more than 50 %" in most.volume_rule


def test_layer4_maps_are_pooled(src, model):
    x, _ = src.sample(4)
    maps = np.repeat(x[:, :, None, None], 4, axis=2).repeat(3, axis=3).astype(np.float32)
    np.testing.assert_allclose(pooled(maps), x, rtol=1e-5)
    np.testing.assert_allclose(model.score(maps), model.score(x), rtol=1e-4)


def test_fit_without_validation_holds_part_out(src):
    x, y = src.sample(300)
    m = fit_ood(x, y, n_components=16, quantile=0.9)
    assert m.validation["n"] == 60 and "held-out" in m.validation["on"]
    assert m.validation["false_refusal_rate"] <= 0.1
    with pytest.raises(ModelError, match="labels"):
        fit_ood(x, y[:-1])
    with pytest.raises(ModelError, match="quantile"):
        fit_ood(x, y, quantile=1.0)


def test_not_available_without_model_or_features(model):
    c = check(None, np.zeros((3, C)))
    assert not c.available and c.note == NOT_AVAILABLE and not c.out_of_distribution
    assert not check(model, None).available


# --------------------------------------------------------------------------- bundle files
@pytest.fixture
def bundle_dir(tmp_path):
    return make_bundle(tmp_path / "b", organ="lung")


def _model_2048(seed=0):
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(1, 0.3, (80, 2048)))
    return fit_ood(x, rng.integers(0, 3, 80), n_components=8)


def test_save_and_load_in_a_bundle(bundle_dir):
    m = _model_2048()
    before = json.loads((bundle_dir / "configs/metadata.json").read_text())
    save_ood(bundle_dir, m, fitted_on="synthetic features (test)")
    md = json.loads((bundle_dir / "configs/metadata.json").read_text())
    e = md["ood"]
    assert e["method"] == METHOD and e["file"] == OOD_FILE and len(e["sha256"]) == 64
    assert e["n_components"] == 8 and e["slice_threshold"] == pytest.approx(m.slice_threshold)
    assert e["fitted_on"] == "synthetic features (test)" and e["volume_out_fraction"] == 0.5
    assert "more than 50 %" in e["volume_rule"] and e["validation"]["n"] == 16
    assert md["weights"] == before["weights"]                        # weights untouched
    b = load_bundle(bundle_dir, allow_untrained=True)
    got = b.ood()
    x = np.abs(np.random.default_rng(5).normal(1, 0.3, (6, 2048)))
    np.testing.assert_allclose(got.score(x), m.score(x), rtol=1e-5)
    assert b.card()["ood"]["method"] == METHOD


def test_tampered_ood_file_is_refused(bundle_dir):
    save_ood(bundle_dir, _model_2048(), fitted_on="test")
    f = bundle_dir / OOD_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle_dir, allow_untrained=True)


def test_bundle_without_ood_still_works(bundle_dir):
    b = load_bundle(bundle_dir, allow_untrained=True)
    assert b.ood() is None and b.card()["ood"] is None
    assert not check(b.ood(), np.zeros((2, 2048))).available
