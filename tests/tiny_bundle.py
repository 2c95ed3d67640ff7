"""Small model bundles for tests (model stage helpers, used by every stage's tests).

The architecture is always the real ResNet50 (bundles only hold that), with seeded random
weights, ``trained: false`` unless asked, and optionally a head bias that makes one label
win on every slice, so verdict-dependent code can be tested without a trained model.

Example::

    from tiny_bundle import make_bundle
    path = make_bundle(tmp_path / "b", organ="lung", favour="malignant")
    bundle = dicompipe.model.load_bundle(path, allow_untrained=True)
"""
from __future__ import annotations

from pathlib import Path

import torch

from dicompipe.model.bundle import save_bundle
from dicompipe.model.network import resnet50
from dicompipe.types import PreprocessSpec

LABELS = {"lung": ["normal", "benign", "malignant"], "pancreas": ["normal", "tumour"]}
POSITIVE = {"lung": ["malignant"], "pancreas": ["tumour"]}


def make_net(n_labels: int = 3, in_channels: int = 3, seed: int = 0,
             favour: int | None = None, bias: float = 6.0) -> torch.nn.Module:
    """A seeded random ResNet50 (eval mode); ``favour`` adds ``bias`` to that class's logit."""
    torch.manual_seed(seed)
    net = resnet50(num_classes=n_labels, in_channels=in_channels).eval()
    if favour is not None:
        with torch.no_grad():
            net.fc.bias.zero_()
            net.fc.bias[favour] = bias
    return net


def make_bundle(path, organ: str = "lung", *, labels: list[str] | None = None,
                spec: PreprocessSpec | None = None, trained: bool = False, seed: int = 0,
                favour: str | None = None, bias: float = 6.0, name: str | None = None,
                aggregation: dict | None = None, temperature: float = 1.0,
                dtype: str = "float16") -> Path:
    """Write a test bundle folder at ``path`` and return it.

    ``favour``: a label that should win (its head bias is raised by ``bias``).
    ``trained``: what metadata.json claims (False by default, like a fixture should).
    """
    labels = list(labels or LABELS[organ])
    spec = spec or PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)]
                                  if organ == "lung" else [(40.0, 400.0), (60.0, 200.0), (-160.0, 240.0)])
    net = make_net(len(labels), spec.channels, seed, labels.index(favour) if favour else None, bias)
    md = {"name": name or f"test-{organ}-resnet50", "version": "0.0.1", "organ": organ,
          "labels": labels, "positive_labels": [l for l in POSITIVE.get(organ, []) if l in labels],
          "preprocessing": spec, "trained": trained,
          "calibration": {"temperature": temperature, "method": "fixture"},
          "training": {"data": "none: seeded random weights for tests"},
          "intended_use": "Tests only. Random weights."}
    if aggregation:
        md["aggregation"] = aggregation
    return save_bundle(path, net, md, dtype=dtype)
