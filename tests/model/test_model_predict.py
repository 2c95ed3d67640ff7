"""model.predict (batched torch inference, layer4 kept) and model.aggregate (rules,
temperature, uncertain band, key slices)."""
import dataclasses

import numpy as np
import pytest
from tiny_bundle import chest_phantom, make_bundle, make_volume

from dicompipe.errors import ModelError
from dicompipe.model import aggregate, get_backend, load_bundle, predict, softmax
from dicompipe.model.aggregate import negative_index
from dicompipe.preprocess import prepare
from dicompipe.types import PreprocessSpec, SlicePredictions


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    p = make_bundle(tmp_path_factory.mktemp("b") / "lung", organ="lung",
                    spec=PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0)], size=64),
                    favour="malignant", bias=2.0)
    return load_bundle(p, allow_untrained=True)


@pytest.fixture(scope="module")
def batch(bundle):
    return prepare(make_volume(chest_phantom((7, 48, 48), lung_z=(0.0, 1.0))), bundle.spec,
                   organ="lung")


def test_predict_outputs_and_features(bundle, batch):
    import torch  # torch and MONAI are imported by the tests that use them, not at collection

    from dicompipe.model.network import forward_with_features

    seen = []
    before = torch.get_num_threads()
    p = predict(bundle, batch, device="cpu", backend="torch", batch_size=3, threads=1,
                progress=seen.append)
    assert torch.get_num_threads() == before              # thread count restored
    n = len(batch.tensors)
    assert p.labels == bundle.labels and p.logits.shape == (n, 3)
    assert p.features.shape == (n, 2048, 2, 2) and p.features.dtype == np.float32
    np.testing.assert_allclose(p.probabilities.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p.probabilities, softmax(p.logits), atol=1e-6)
    net = bundle.network()
    np.testing.assert_array_equal(p.head_weight, net.fc.weight.detach().numpy())
    np.testing.assert_array_equal(p.head_bias, net.fc.bias.detach().numpy())
    # the logits are the head applied to the pooled layer4 features that were returned
    np.testing.assert_allclose(p.features.mean((2, 3)) @ p.head_weight.T + p.head_bias,
                               p.logits, rtol=1e-4, atol=1e-4)
    # same numbers as the plain (unfused, NCHW) network
    with torch.inference_mode():
        ref, a = forward_with_features(net, torch.from_numpy(batch.tensors))
    np.testing.assert_allclose(p.logits, ref.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(p.features, a.numpy(), rtol=1e-3, atol=1e-3)
    assert seen == [3 / n, 6 / n, 1.0]
    assert p.model_info["backend"] == "torch" and p.model_info["device"] == "cpu"
    assert p.batch is batch and p.seconds > 0


def test_predict_is_deterministic_and_batch_size_invariant(bundle, batch):
    a = predict(bundle, batch, backend="torch", device="cpu", batch_size=7)
    b = predict(bundle, batch, backend="torch", device="cpu", batch_size=7)
    c = predict(bundle, batch, backend="torch", device="cpu", batch_size=2)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_allclose(a.logits, c.logits, rtol=1e-4, atol=1e-4)


def test_default_batch_is_larger_on_a_gpu(bundle, batch, monkeypatch):
    """No batch size given: 16 slices per call on a CPU, 64 where the backend runs on a GPU."""
    import importlib
    P = importlib.import_module("dicompipe.model.inference")
    assert predict(bundle, batch, backend="torch", device="cpu").model_info["batch_size"] == 16
    calls = []

    class OnGpu:                     # what a torch backend on "cuda" looks like to predict()
        device = "cuda:0"

        def __call__(self, x):
            calls.append(len(x))
            return np.zeros((len(x), 3), np.float32), np.zeros((len(x), 2048, 2, 2), np.float32)
    monkeypatch.setattr(P, "get_backend", lambda *a, **k: OnGpu())
    big = dataclasses.replace(batch, tensors=np.repeat(batch.tensors, 20, axis=0),
                              slices=batch.slices * 20)
    assert P.predict(bundle, big).model_info["batch_size"] == 64
    assert calls == [64, 64, len(big.tensors) - 128]


def test_predict_rejects_wrong_tensors_and_options(bundle, batch):
    import torch

    wrong = prepare(batch.volume, PreprocessSpec(size=32), select_slices=False)
    with pytest.raises(ModelError, match=r"expects tensors \(n, 3, 64, 64\)"):
        predict(bundle, wrong, backend="torch")
    with pytest.raises(ModelError, match="Unknown backend"):
        get_backend(bundle, "tensorrt", "cpu")
    with pytest.raises(ModelError, match="Unknown device"):
        get_backend(bundle, "torch", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA GPU"):
            get_backend(bundle, "torch", "cuda")


# --------------------------------------------------------------------------- aggregate
def _preds(batch, logits, labels=("normal", "benign", "malignant")):
    logits = np.asarray(logits, np.float32)
    return SlicePredictions(labels=list(labels), logits=logits, probabilities=softmax(logits),
                            features=None, head_weight=np.zeros((len(labels), 2048), np.float32),
                            head_bias=np.zeros(len(labels), np.float32), batch=batch)


def _logits_for(p):
    return np.log(np.asarray(p, np.float64))


def test_softmax_and_negative_class():
    np.testing.assert_allclose(softmax([[0.0, np.log(3.0)]]), [[0.25, 0.75]], atol=1e-7)
    assert softmax(np.array([[1000.0, 0.0]]))[0, 0] == 1.0          # no overflow
    assert negative_index(["tumour", "normal"]) == 1
    assert negative_index(["a", "b"]) == 0


@pytest.fixture(scope="module")
def slice_probs():
    # 7 slices: mostly normal, two clearly malignant slices
    return np.array([[.90, .05, .05], [.80, .15, .05], [.10, .10, .80], [.85, .10, .05],
                     [.20, .10, .70], [.90, .05, .05], [.70, .20, .10]])


@pytest.mark.parametrize("rule,k", [("topk_mean", 2), ("topk_mean", 3), ("max", None),
                                    ("mean", None), ("noisy_or", None)])
def test_rules_by_hand(batch, slice_probs, rule, k):
    p = slice_probs
    v = aggregate(_preds(batch, _logits_for(p)), rule=rule, k=k)
    if rule == "topk_mean":
        s = np.array([0.0] + [np.sort(p[:, c])[-k:].mean() for c in (1, 2)])
    elif rule == "max":
        s = np.array([0.0, p[:, 1].max(), p[:, 2].max()])
    elif rule == "mean":
        s = np.array([0.0, p[:, 1].mean(), p[:, 2].mean()])
    else:
        s = np.array([0.0] + [1 - np.prod(1 - p[:, c]) for c in (1, 2)])
    if s.sum() > 1:
        s = s / s.sum()
    s[0] = 1 - s.sum()
    assert list(v.probabilities) == ["normal", "benign", "malignant"]
    np.testing.assert_allclose(list(v.probabilities.values()), s, atol=1e-5)
    assert v.label == ["normal", "benign", "malignant"][int(np.argmax(s))]
    assert v.n_slices == 7 and v.temperature == 1.0
    if rule == "mean":                      # mean is exactly the mean probability vector
        np.testing.assert_allclose(list(v.probabilities.values()), p.mean(0), atol=1e-5)


def test_default_topk_finds_a_few_malignant_slices(batch, slice_probs):
    v = aggregate(_preds(batch, _logits_for(slice_probs)), k=2)
    assert v.label == "malignant" and v.rule == "topk_mean(k=2)"
    # key slices: the two malignant slices, strongest first, with their source instances
    rows = [ks.row for ks in v.key_slices]
    assert rows == [2, 4]
    by_row = {s.row: s for s in batch.included}
    for ks in v.key_slices:
        src = by_row[ks.row].sources
        assert ks.z == by_row[ks.row].z
        assert ks.instance_numbers == [r.instance_number for r in src]
        assert ks.sop_instance_uids == [r.sop_instance_uid for r in src]
    assert v.key_slices[0].probability == pytest.approx(0.80, abs=1e-5)


def test_temperature_and_uncertain_band(batch):
    logits = np.array([[0.0, 0.0, 1.0]] * 7)
    sharp = aggregate(_preds(batch, logits), rule="mean", temperature=0.5)
    soft = aggregate(_preds(batch, logits), rule="mean", temperature=2.0)
    np.testing.assert_allclose(sharp.probabilities["malignant"],
                               softmax(logits[:1] / 0.5)[0, 2], atol=1e-6)
    assert soft.probabilities["malignant"] < sharp.probabilities["malignant"]
    assert soft.uncertain is True and soft.probabilities["malignant"] < 0.6
    assert sharp.uncertain is False and sharp.temperature == 0.5
    narrow = aggregate(_preds(batch, logits), rule="mean", temperature=2.0,
                       uncertain_band=(0.0, 0.1))
    assert narrow.uncertain is False and narrow.uncertain_band == (0.0, 0.1)


def test_bundle_defaults_and_bad_options(bundle, batch):
    p = predict(bundle, batch, backend="torch", device="cpu")
    v = aggregate(p, bundle=bundle)
    assert v.rule == "topk_mean(k=5)" and v.uncertain_band == (0.4, 0.6)
    assert v.label == "malignant"                      # the fixture's favoured label
    assert len(v.key_slices) == min(5, len(batch.tensors))
    for bad, msg in [({"rule": "median"}, "Unknown aggregation rule"), ({"k": 0}, "k must be"),
                     ({"temperature": 0.0}, "temperature must be"),
                     ({"uncertain_band": (0.7, 0.2)}, "uncertain_band")]:
        with pytest.raises(ModelError, match=msg):
            aggregate(p, **bad)


def test_binary_pancreas_labels(batch):
    logits = _logits_for([[0.9, 0.1]] * 6 + [[0.2, 0.8]])
    v = aggregate(_preds(batch, logits, labels=("normal", "tumour")), rule="max")
    assert v.probabilities == pytest.approx({"normal": 0.2, "tumour": 0.8}, abs=1e-5)
    assert v.label == "tumour" and [k.row for k in v.key_slices] == [6]


def test_fold_batchnorm_keeps_outputs_and_leaves_bundle_untouched(bundle):
    import copy

    import torch

    from dicompipe.model.backends import fold_batchnorm
    from dicompipe.model.network import forward_with_features

    net = bundle.network()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    folded = fold_batchnorm(copy.deepcopy(net))
    assert n_bn == 53
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        (l0, a0), (l1, a1) = forward_with_features(net, x), forward_with_features(folded, x)
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-3)


def test_cli_backend_choices_are_the_model_stage_backends():
    from dicompipe import cli
    from dicompipe.model.backends import BACKENDS
    assert list(cli.BACKENDS) == list(BACKENDS)
