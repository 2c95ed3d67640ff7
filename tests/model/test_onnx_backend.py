"""ONNX Runtime backend: agreement with torch, export cache, int8 gate (optional extra).

Skipped when onnxruntime is not installed (``pip install dicompipe[fast]``). One export of a
random-weight ResNet50 per module (~10 s), inputs at 64x64 to keep the forwards cheap.

onnxruntime, onnx and torch are imported when the tests run, not when pytest collects them
(``find_spec`` only looks the packages up; the ``ob`` fixture imports the backend module).
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

for _extra in ("onnxruntime", "onnx"):
    if importlib.util.find_spec(_extra) is None:
        pytest.skip(f"{_extra} is not installed (pip install 'dicompipe[fast]')", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: tiny_bundle
from tiny_bundle import make_bundle  # noqa: E402

from dicompipe.errors import ModelError  # noqa: E402
from dicompipe.explain import class_maps  # noqa: E402
from dicompipe.model.backends import get_backend  # noqa: E402
from dicompipe.model.bundle import load_bundle  # noqa: E402


@pytest.fixture(scope="module")
def ob():
    """The module ``dicompipe.model.onnx_backend`` (it imports onnxruntime)."""
    from dicompipe.model import onnx_backend
    return onnx_backend


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("onnx") / "b", organ="lung", seed=3)
    return load_bundle(path, allow_untrained=True)


@pytest.fixture(scope="module")
def backend(ob, bundle):
    return ob.OnnxBackend(bundle, "cpu")


def _torch(bundle, x):
    import torch

    from dicompipe.model.network import forward_with_features

    with torch.inference_mode():
        lg, a = forward_with_features(bundle.network(), torch.from_numpy(x))
    return lg.numpy(), a.numpy()


def test_agrees_with_torch(bundle, backend):
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    lg, a = backend(x)
    tl, ta = _torch(bundle, x)
    assert lg.dtype == np.float32 and lg.shape == (4, 3) and a.shape == (4, 2048, 2, 2)
    # logits within 1e-4 (relative to the logit scale: random weights give |logits| ~ 50)
    assert np.abs(lg - tl).max() <= 1e-4 * max(1.0, np.abs(tl).max())
    assert (lg.argmax(1) == tl.argmax(1)).all()
    assert np.abs(a - ta).max() <= 1e-4 * np.abs(ta).max()
    w = bundle.network().fc.weight.detach().numpy()
    cam, tcam = class_maps(a, w), class_maps(ta, w)
    assert np.abs(cam - tcam).max() <= 1e-4 * tcam.max()


def test_dilated_layer4_bundle(ob, tmp_path):
    """A 2.x bundle (layer4 dilated, stride 16): the network it builds and its ONNX export
    give a class map twice as fine as the standard one, with the same logits."""
    path = make_bundle(tmp_path / "d", organ="lung", seed=3, layer4_dilation=2)
    dilated = load_bundle(path, allow_untrained=True)
    assert dilated.metadata["network"]["layer4_dilation"] == 2
    x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
    tl, ta = _torch(dilated, x)
    assert ta.shape == (2, 2048, 4, 4)
    lg, a = ob.OnnxBackend(dilated, "cpu")(x)
    assert a.shape == ta.shape
    assert np.abs(lg - tl).max() <= 1e-4 * max(1.0, np.abs(tl).max())


def test_evidence_pooling_bundle(ob, tmp_path):
    """A bundle whose abnormal logits pool the top cells: its ONNX export gives the torch
    network's logits, and it has its own cache file (the weights alone cannot tell)."""
    plain = load_bundle(make_bundle(tmp_path / "p", organ="lung", seed=3, layer4_dilation=2),
                        allow_untrained=True)
    top = load_bundle(make_bundle(tmp_path / "t", organ="lung", seed=3, layer4_dilation=2,
                                  abnormal_top=0.25), allow_untrained=True)
    assert top.abnormal_top == 0.25 and top.network().abnormal_top == 0.25
    assert ".top0.25." in ob.model_path(top).name and ".top" not in ob.model_path(plain).name
    x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
    tl, _ = _torch(top, x)
    pl, _ = _torch(plain, x)
    assert not np.allclose(tl, pl)
    lg, _ = ob.OnnxBackend(top, "cpu")(x)
    assert np.abs(lg - tl).max() <= 1e-4 * max(1.0, np.abs(tl).max())


def test_dynamic_batch_and_get_backend(ob, bundle, backend):
    x = np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype(np.float32)
    assert backend(x)[0].shape == (1, 3)
    run = get_backend(bundle, "onnx", "cpu")
    assert isinstance(run, ob.OnnxBackend) and run.path == backend.path
    assert run.name == "onnx" and run.device == "cpu" and run.threads >= 1


def test_cache_beside_bundle_keyed_by_sha(ob, bundle, backend):
    p = backend.path
    assert p.parent == Path(bundle.path) / "models" / "onnx"
    assert bundle.sha256 in p.name and p.name.endswith(".fp32.onnx")
    mtime = p.stat().st_mtime_ns
    assert ob.export(bundle) == p and p.stat().st_mtime_ns == mtime     # reused, not rebuilt
    assert not list(p.parent.glob(".*.tmp"))                             # atomic: no leftovers

    class Other:                                                         # new weights -> new file
        path, name, sha256, layer4_dilation, abnormal_top = bundle.path, "x", "0" * 64, 1, 0.0
    assert ob.model_path(Other, "fp32") != p
    stale = p.parent / f"{'f' * 64}.v{ob.EXPORT_VERSION}.fp32.onnx"
    stale.write_bytes(b"old")
    ob._remove_stale(p, "fp32")
    assert not stale.exists() and p.exists()


def test_builtin_bundles_use_user_cache(ob, monkeypatch, tmp_path):
    from dicompipe.model.bundle import BUILTIN_DIR
    monkeypatch.setenv("DICOMPIPE_CACHE", str(tmp_path / "cache"))

    class Builtin:
        path, name, sha256 = BUILTIN_DIR / "lung-resnet50", "lung-resnet50", "a" * 64
    assert ob.cache_dir(Builtin) == tmp_path / "cache" / "onnx"


def test_int8_needs_calibration(ob, bundle):
    with pytest.raises(ModelError, match="int8"):
        ob.OnnxBackend(bundle, precision="int8")
    with pytest.raises(ModelError, match="precision"):
        ob.OnnxBackend(bundle, precision="fp16")
    with pytest.raises(ModelError, match="int8"):
        get_backend(bundle, "onnx-int8", "cpu")



def test_int8_refused_on_a_runtime_that_failed_the_gate(ob, bundle):
    """One calibration, two int8 runtimes: only those listed as validated may use it."""
    cal = ob.calibration_path(bundle)
    cal.write_text(json.dumps({"sha256": bundle.sha256, "validated": ["openvino-int8"], "tensors": {}}))
    try:
        with pytest.raises(ModelError, match="only as openvino-int8, not as onnx-int8"):
            ob.OnnxBackend(bundle, precision="int8")
    finally:
        os.unlink(cal)


def _ranges(ob, backend, tmp_path) -> Path:
    """Calibration ranges of ``backend``'s export from two random batches."""
    from onnxruntime.quantization import CalibrationDataReader

    rng = np.random.default_rng(2)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.normal(size=(2, 3, 64, 64)).astype(np.float32)}
                            for _ in range(2)])

        def get_next(self):
            return next(self.it, None)

    ranges = tmp_path / "ranges.json"
    ob.quantize_static_file(backend.path, tmp_path / "cal.onnx", Reader(), calibration_cache=ranges)
    return ranges


@pytest.mark.slow
def test_int8_from_stored_calibration(ob, bundle, backend, tmp_path):
    """The int8 path end to end on random data: calibrate, store ranges, quantize, run."""
    rng = np.random.default_rng(2)
    ranges = _ranges(ob, backend, tmp_path)
    cal = ob.calibration_path(bundle)
    cal.write_text(json.dumps({"sha256": bundle.sha256, "tensors": json.loads(ranges.read_text())}))
    try:
        run = ob.OnnxBackend(bundle, precision="int8")
        assert run.name == "onnx-int8" and ".int8-" in run.path.name
        assert run.path.stat().st_size < backend.path.stat().st_size / 3
        x = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
        lg, a = run(x)
        tl, _ = backend(x)
        assert lg.shape == tl.shape and a.shape == (2, 2048, 2, 2)
        assert np.corrcoef(lg.ravel(), tl.ravel())[0, 1] > 0.9
        cal.write_text(cal.read_text().replace("{", "{\"note\": \"new ranges\", ", 1))
        again = ob.OnnxBackend(bundle, precision="int8")
        assert again.path != run.path and not run.path.exists()      # new ranges, new file
    finally:
        os.unlink(cal)


@pytest.mark.slow
def test_int8_keeps_the_classifier_float_when_the_calibration_says_so(ob, bundle, backend, tmp_path):
    import onnx

    head = ob.classifier_nodes(backend.path)
    assert head == [n.name for n in onnx.load(str(backend.path)).graph.node if n.op_type == "Gemm"]
    tensors = json.loads(_ranges(ob, backend, tmp_path).read_text())
    cal = ob.calibration_path(bundle)

    def gemm_weights_from(float_nodes):
        cal.write_text(json.dumps({"sha256": bundle.sha256, "tensors": tensors, "float_nodes": float_nodes}))
        graph = onnx.load(str(ob.OnnxBackend(bundle, precision="int8").path)).graph
        made_by = {o: n.op_type for n in graph.node for o in n.output}
        gemm = next(n for n in graph.node if n.name == head[0])
        return [made_by.get(i, "initializer") for i in gemm.input[1:]]

    try:
        assert gemm_weights_from([]) == ["DequantizeLinear"] * 2        # int8 weight, int32 bias
        assert gemm_weights_from(head) == ["initializer"] * 2           # float32
    finally:
        os.unlink(cal)


def test_optimised_model_is_cached_per_runtime_and_cpu(ob, bundle, tmp_path, monkeypatch):
    from dicompipe.util import cpu_key
    monkeypatch.setenv("DICOMPIPE_CACHE", str(tmp_path))
    x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
    first = ob.OnnxBackend(bundle, "cpu")                        # optimises and saves
    saved = list((tmp_path / "onnx-optimized").glob(f"*-{cpu_key()}/*.opt.onnx"))
    assert len(saved) == 1 and saved[0].name.startswith(f"{first.path.stem}.")
    second = ob.OnnxBackend(bundle, "cpu")                       # loads the saved graph
    assert np.allclose(first(x)[0], second(x)[0], atol=1e-5)
    assert not list(saved[0].parent.glob(".*"))                  # no temporary file left
    os.utime(first.path, ns=(1, 1))                              # the export was made again:
    ob.OnnxBackend(bundle, "cpu")                                # its own optimised graph
    again = list(saved[0].parent.glob("*.opt.onnx"))
    assert len(again) == 1 and again != saved
    monkeypatch.setenv("DICOMPIPE_ORT_CACHE", "0")
    assert np.allclose(ob.OnnxBackend(bundle, "cpu")(x)[1], first(x)[1], atol=1e-5)
