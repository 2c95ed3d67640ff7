"""Shared pytest settings. Tests never need the shared data folder: data are synthesised in fixtures,
taken from pydicom's bundled test files, or from small samples under examples/.

Helper modules beside this file (importable from tests as plain modules):
  synth.py          synthetic DICOM / image / NIfTI writers with known geometry (io stage)
  tiny_bundle.py    tiny model bundles for tests (model stage)

Collection stays fast (a few seconds): test modules and helpers do not import torch, MONAI
(``dicompipe.model.network``, ``dicompipe.train.data``/``pretrain``), onnx/onnxruntime,
openvino, streamlit, playwright, nibabel or matplotlib at module level. Tests import them
in their body or in a fixture (``import torch`` inside the test); optional extras are
checked with ``importlib.util.find_spec``, which looks a package up without importing it.
Check with ``python -X importtime -m pytest --collect-only -q -s 2>imports.txt``.
"""
import os

import pytest

# One thread per test process: tests are small, and CI machines have 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tmp_history(tmp_path, monkeypatch):
    """A private case-history database for a test (never the user's)."""
    db = tmp_path / "history.sqlite"
    monkeypatch.setenv("DICOMPIPE_HISTORY", str(db))
    return db
