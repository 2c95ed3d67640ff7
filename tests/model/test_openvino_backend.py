"""OpenVINO backend (optional extra ``dicompipe[openvino]``): agreement with torch at fp32,
the same export cache as ONNX Runtime, bf16 only where the CPU has it, int8 gate.

openvino, onnxruntime and torch are imported when the tests run, not when pytest collects
them (``find_spec`` only looks the packages up; the ``vb`` fixture imports the backend module).
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

for _extra in ("openvino", "onnxruntime"):
    if importlib.util.find_spec(_extra) is None:
        pytest.skip(f"{_extra} is not installed (pip install 'dicompipe[openvino]')",
                    allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: tiny_bundle
from tiny_bundle import make_bundle  # noqa: E402

from dicompipe.errors import ModelError  # noqa: E402
from dicompipe.model.backends import get_backend  # noqa: E402
from dicompipe.model.bundle import load_bundle  # noqa: E402


@pytest.fixture(scope="module")
def vb():
    """The module ``dicompipe.model.openvino_backend`` (it imports openvino)."""
    from dicompipe.model import openvino_backend
    return openvino_backend


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(make_bundle(tmp_path_factory.mktemp("ov") / "b", organ="lung", seed=5),
                       allow_untrained=True)


def test_fp32_agrees_with_torch_and_shares_the_onnx_export(vb, bundle):
    import torch

    from dicompipe.model import onnx_backend as ob
    from dicompipe.model.network import forward_with_features

    run = get_backend(bundle, "openvino", "cpu")
    assert isinstance(run, vb.OpenVinoBackend) and run.name == "openvino"
    assert run.path == ob.model_path(bundle, "fp32")              # the ONNX Runtime cache file
    assert get_backend(bundle, "openvino", "cpu") is run          # built once per bundle
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    lg, a = run(x)
    with torch.inference_mode():
        tl, ta = (t.numpy() for t in forward_with_features(bundle.network(), torch.from_numpy(x)))
    assert lg.shape == (3, 3) and a.shape == (3, 2048, 2, 2) and lg.dtype == np.float32
    assert np.abs(lg - tl).max() <= 1e-4 * max(1.0, np.abs(tl).max())
    assert np.abs(a - ta).max() <= 1e-4 * np.abs(ta).max()
    lg2, _ = run(x[:1])                                           # dynamic batch, fresh buffers
    np.testing.assert_allclose(lg2, lg[:1], rtol=1e-4, atol=1e-4 * np.abs(tl).max())
    assert np.abs(lg - run(x)[0]).max() == 0                      # outputs are not aliased


def test_a_call_is_split_across_the_streams_in_slice_order(vb, bundle):
    x = np.random.default_rng(1).normal(size=(5, 3, 64, 64)).astype(np.float32)
    two = vb.OpenVinoBackend(bundle, threads=2)
    one = vb.OpenVinoBackend(bundle, threads=1)
    assert len(two.requests) >= 2 and len(one.requests) == 1
    lg, a = two(x)
    lg1, a1 = one(x)
    assert lg.shape == (5, 3) and a.shape == (5, 2048, 2, 2)
    np.testing.assert_allclose(lg, lg1, rtol=1e-4, atol=1e-4 * np.abs(lg1).max())
    np.testing.assert_allclose(a, a1, rtol=1e-4, atol=1e-4 * np.abs(a1).max())
    single = np.concatenate([two(x[i:i + 1])[0] for i in range(5)])   # fewer slices than streams
    np.testing.assert_allclose(single, lg, rtol=1e-4, atol=1e-4 * np.abs(lg).max())


def test_bf16_only_with_native_support(vb, bundle):
    if not vb.native_bf16():
        with pytest.raises(ModelError, match="bfloat16"):
            vb.OpenVinoBackend(bundle, precision="bf16")
        return
    run = vb.OpenVinoBackend(bundle, precision="bf16")
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    lg, _ = run(x)
    ref, _ = vb.OpenVinoBackend(bundle, precision="fp32")(x)
    assert run.name == "openvino-bf16"
    assert np.corrcoef(lg.ravel(), ref.ravel())[0, 1] > 0.99      # close, not exact


def test_refusals_are_clear(vb, bundle):
    with pytest.raises(ModelError, match="int8"):
        get_backend(bundle, "openvino-int8", "cpu")              # no validated calibration
    with pytest.raises(ModelError, match="precision"):
        vb.OpenVinoBackend(bundle, precision="fp16")
    with pytest.raises(ModelError, match="CPU only"):
        vb.OpenVinoBackend(bundle, device="cuda")
    with pytest.raises(ModelError, match="Unknown backend"):
        get_backend(bundle, "tensorrt", "cpu")


def test_auto_prefers_openvino_fp32_on_cpu(vb, bundle):
    run = get_backend(bundle, "auto", "cpu")
    assert isinstance(run, vb.OpenVinoBackend) and run.precision == "fp32"


def test_compiled_model_cache_is_keyed_by_runtime_and_cpu(vb, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMPIPE_CACHE", str(tmp_path))
    x = np.zeros((1, 3, 64, 64), np.float32)
    first = vb.OpenVinoBackend(bundle)
    folder = first.cache_dir
    assert folder.parent == tmp_path / "openvino" and folder.name.endswith(vb.cpu_key())
    blobs = list(folder.glob("*.blob"))
    assert len(blobs) == 1                                         # compiled once, stored
    second = vb.OpenVinoBackend(bundle)                           # imports the blob
    assert list(folder.glob("*.blob")) == blobs
    assert np.array_equal(first(x)[0], second(x)[0])
    monkeypatch.setenv("DICOMPIPE_OV_CACHE", "0")
    assert vb.OpenVinoBackend(bundle).cache_dir is None
