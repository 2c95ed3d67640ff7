"""Shared pytest settings. Tests never need the shared data folder: data are synthesised in fixtures,
taken from pydicom's bundled test files, or from small samples under examples/.

Helper modules beside this file (importable from tests as plain modules):
  synth.py          synthetic DICOM / image / NIfTI writers with known geometry (io stage)
  tiny_bundle.py    tiny model bundles for tests (model stage)
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
