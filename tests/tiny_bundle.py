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
from typing import TYPE_CHECKING

import numpy as np

from dicompipe.model.bundle import save_bundle
from dicompipe.types import PreprocessSpec

if TYPE_CHECKING:
    import torch

LABELS = {"lung": ["normal", "benign", "malignant"], "pancreas": ["normal", "tumour"]}
POSITIVE = {"lung": ["malignant"], "pancreas": ["tumour"]}


def make_net(n_labels: int = 3, in_channels: int = 3, seed: int = 0,
             favour: int | None = None, bias: float = 6.0,
             head_scale: float = 0.05) -> torch.nn.Module:
    """A seeded random ResNet50 (eval mode); ``favour`` adds ``bias`` to that class's logit.

    ``head_scale`` shrinks the random head so logits are O(1) (an untouched random head
    gives logits of +-30 and saturated, meaningless probabilities).
    """
    import torch  # here, not at the top: importing torch and MONAI slows test collection

    from dicompipe.model.network import resnet50

    torch.manual_seed(seed)
    net = resnet50(num_classes=n_labels, in_channels=in_channels).eval()
    with torch.no_grad():
        net.fc.weight.mul_(head_scale)
    if favour is not None:
        with torch.no_grad():
            net.fc.bias.zero_()
            net.fc.bias[favour] = bias
    return net


def make_bundle(path, organ: str = "lung", *, labels: list[str] | None = None,
                spec: PreprocessSpec | None = None, trained: bool = False, seed: int = 0,
                favour: str | None = None, bias: float = 6.0, name: str | None = None,
                aggregation: dict | None = None, temperature: float = 1.0,
                dtype: str = "float16", layer4_dilation: int = 1,
                abnormal_top: float = 0.0) -> Path:
    """Write a test bundle folder at ``path`` and return it.

    ``favour``: a label that should win (its head bias is raised by ``bias``).
    ``trained``: what metadata.json claims (False by default, like a fixture should).
    ``layer4_dilation``: recorded in the metadata's ``network`` (2 = the 2.x bundles' finer map),
    as ``abnormal_top`` (evidence pooling of the abnormal logits).
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
    md["network"] = {**({"layer4_dilation": layer4_dilation} if layer4_dilation != 1 else {}),
                     **({"abnormal_top": abnormal_top} if abnormal_top else {})}
    if aggregation:
        md["aggregation"] = aggregation
    return save_bundle(path, net, md, dtype=dtype)


# --------------------------------------------------------------------------- volumes
def chest_phantom(shape=(40, 64, 64), lung_z=(0.2, 0.8), seed: int = 0):
    """A chest-like HU array (z, y, x): air outside, a soft-tissue body ellipse, two lungs
    (-850 HU) only between fractions ``lung_z`` of the z range (abdomen-like elsewhere),
    a 60 HU nodule in the right lung and a little noise."""
    nz, ny, nx = shape
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    zf = np.linspace(0, 1, nz)
    body = np.where((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1, 40.0, -1000.0).astype(np.float32)
    chest = body.copy()
    for cx in (-0.42, 0.42):
        chest[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850.0
    nodule = chest.copy()
    nodule[((x + 0.42) ** 2 + y ** 2) < 0.08 ** 2] = 60.0
    a = np.empty(shape, np.float32)
    noise = rng.normal(0, 10, (ny, nx)).astype(np.float32)
    for z in range(nz):
        base = (nodule if abs(zf[z] - 0.5) < 0.1 else chest) if lung_z[0] <= zf[z] <= lung_z[1] else body
        a[z] = base + np.roll(noise, 7 * z, axis=1)
    return a


def make_volume(hu, spacing=(0.8, 0.8, 1.0), origin=(-100.0, -120.0, -300.0), direction=None,
                windowed: bool = False, uids: bool = True):
    """A dicompipe Volume straight from an array (z, y, x), one synthetic instance per z.

    ``spacing`` is (x, y, z) mm; ``direction`` a SimpleITK row-major 9-tuple (identity default).
    """
    import SimpleITK as sitk

    from dicompipe.types import InstanceRef, SeriesInfo, Volume

    img = sitk.GetImageFromArray(np.asarray(hu, np.float32))
    img.SetSpacing(tuple(map(float, spacing)))
    img.SetOrigin(tuple(map(float, origin)))
    if direction is not None:
        img.SetDirection(tuple(map(float, direction)))
    refs = []
    for z in range(img.GetSize()[2]):
        pos = img.TransformIndexToPhysicalPoint((0, 0, z))
        refs.append([InstanceRef(file=f"synthetic/{z:04d}.dcm",
                                 sop_instance_uid=f"1.2.826.0.1.3680043.99.{z + 1}" if uids else None,
                                 instance_number=z + 1, position=pos)])
    series = SeriesInfo(key="synthetic", kind="images" if windowed else "dicom",
                        source="synthetic", instances=[r[0] for r in refs], modality="CT",
                        rows=img.GetSize()[1], columns=img.GetSize()[0],
                        pixel_spacing=(float(spacing[1]), float(spacing[0])),
                        series_description="synthetic chest", orientation="axial")
    return Volume(image=img, slices=refs, series=series, windowed=windowed)
