"""preprocess.resize: numpy bilinear resizing with torch's numbers (antialiased when
shrinking), so the ONNX Runtime / OpenVINO path needs no torch."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicompipe.preprocess.resize import axis_weights, resize


@pytest.mark.parametrize("shape,size", [((512, 512), (224, 224)), ((7, 7), (224, 224)),
                                        ((300, 417), (160, 160)), ((224, 224), (512, 512)),
                                        ((512, 400), (512, 600)), ((3, 9), (2, 20))])
def test_matches_torch_interpolate(shape, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 3) + shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                          align_corners=False, antialias=True).numpy()
    got = resize(x, size)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() < 5e-5


def test_weights_are_a_partition_of_unity_and_identity_is_a_copy():
    for n_in, n_out in [(512, 224), (7, 224), (3, 2), (1, 5)]:
        assert np.allclose(np.asarray(axis_weights(n_in, n_out).sum(1)).ravel(), 1.0)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = resize(x, (3, 4))
    assert np.array_equal(x, y) and not np.shares_memory(x, y)
    assert np.allclose(resize(np.full((5, 6), 2.5, np.float32), (11, 3)), 2.5)


def test_onnx_path_never_imports_torch(tmp_path):
    """analyze() with a non-torch backend (export already cached) runs without torch."""
    pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synth import write_ct_series
    from tiny_bundle import chest_phantom, make_bundle

    from dicompipe.model.bundle import load_bundle
    from dicompipe.model.onnx_backend import export
    bundle = make_bundle(tmp_path / "b", organ="lung")
    export(load_bundle(bundle, allow_untrained=True))                 # the cached export
    series = tmp_path / "ct"
    write_ct_series(series, shape=(6, 48, 48), spacing=(0.8, 0.8, 2.5), origin=(-19.0, -19.0, -100.0),
                    hu=chest_phantom((6, 48, 48), lung_z=(0.0, 1.0)), body_part="CHEST")
    code = ("import sys, dicompipe\n"
            f"a = dicompipe.run_case({str(series)!r}, organ='lung', model={str(bundle)!r}, "
            f"backend='onnx', device='auto', allow_untrained=True, out={str(tmp_path / 'runs')!r}, "
            "history=False)\n"
            "assert a.ok, a.errors\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
