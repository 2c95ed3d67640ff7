"""Pointing game: a small CNN with the ResNet head structure (conv features -> GAP -> linear),
trained here for a few seconds on phantoms with one bright lesion, must put its lesion-class
CAM peak inside the lesion — per slice, and in 3D after mapping back onto an oblique CT grid.
Also the faithfulness checks on that trained model.
"""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from geometry import OBLIQUE, make_batch, make_volume

from dicompipe.errors import ModelError
from dicompipe.explain import gradcam, upsample
from dicompipe.preprocess.render import square_pad
from dicompipe.types import PreprocessSpec, SlicePredictions

LABELS = ["normal", "lesion"]
H, W = 40, 48                  # phantom slice (rows < columns: the batch pads it to 48x48)
R = 3.5                        # lesion radius, pixels


def tiny_resnet_like(n_classes=2):
    """A new TinyResNetLike. The class is defined in here, not at module level, so that
    collecting this file does not import torch (the tests import torch and the torch-based
    explain functions when they run)."""
    from torch import nn

    class TinyResNetLike(nn.Module):
        """conv stem -> ``layer4`` (stride 4 overall) -> global average pool -> ``fc``."""

        def __init__(self, n_classes=2):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(16, n_classes)

        def features(self, x):
            return self.layer4(self.stem(x))

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))

    return TinyResNetLike(n_classes)


def phantom_slice(rng, lesion_at=None, radius=R):
    """A body ellipse with noise and smooth texture; optionally one bright disc."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    body = ((yy - H / 2) / (H * 0.45)) ** 2 + ((xx - W / 2) / (W * 0.45)) ** 2 <= 1
    img = np.where(body, 0.3, 0.0) + rng.normal(0, 0.05, (H, W))
    img += 0.1 * np.sin(xx / rng.uniform(2, 5) + rng.uniform(0, 6)) * body
    if lesion_at is not None:
        cy, cx = lesion_at
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 1.0
    return img.astype(np.float32)


def lesion_position(rng):
    return rng.uniform(H * 0.3, H * 0.7), rng.uniform(W * 0.25, W * 0.75)


def to_input(img):
    sq, _ = square_pad(img[None])              # the same placement the SliceBatch uses
    return sq


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run far faster on one thread when the CPUs are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained():
    import torch
    from torch import nn

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = tiny_resnet_like()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(50):
        ys = rng.integers(0, 2, 32)
        xs = np.stack([to_input(phantom_slice(rng, lesion_position(rng) if y else None)) for y in ys])
        loss = nn.functional.cross_entropy(net(torch.from_numpy(xs)), torch.from_numpy(ys))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_model_learned_the_task(trained):
    import torch

    rng = np.random.default_rng(1)
    ys = np.array([0, 1] * 10)
    xs = np.stack([to_input(phantom_slice(rng, lesion_position(rng) if y else None)) for y in ys])
    with torch.no_grad():
        acc = (trained(torch.from_numpy(xs)).argmax(1).numpy() == ys).mean()
    assert acc >= 0.9


def test_pointing_game_per_slice(trained):
    import torch

    rng = np.random.default_rng(2)
    hits = 0
    n = 12
    for _ in range(n):
        cy, cx = lesion_position(rng)
        x = to_input(phantom_slice(rng, (cy, cx)))
        with torch.no_grad():
            feats = trained.features(torch.from_numpy(x[None]))
        _, (y0, x0, side) = square_pad(np.zeros((H, W)))
        preds = SlicePredictions(labels=LABELS, logits=np.zeros((1, 2)),
                                 probabilities=np.zeros((1, 2)), features=feats.numpy(),
                                 head_weight=trained.fc.weight.detach().numpy(),
                                 head_bias=trained.fc.bias.detach().numpy(), batch=None)
        cam = upsample(gradcam(preds, classes=["lesion"]).maps[0, 0], side)
        py, px = np.unravel_index(np.argmax(cam), cam.shape)
        hits += (py - y0 - cy) ** 2 + (px - x0 - cx) ** 2 <= (R + 1.0) ** 2
    assert hits >= n - 1, f"{hits}/{n} CAM peaks inside the lesion"


def phantom_volume(rng, centre_zyx, radius_mm=(4.0, 3.5, 3.5)):
    """A 3D phantom: stacked body slices with one bright ellipsoid lesion (voxels 1x1x2 mm)."""
    nz = 12
    arr = np.stack([phantom_slice(rng) for _ in range(nz)])
    zz, yy, xx = np.indices(arr.shape)
    cz, cy, cx = centre_zyx
    inside = (((zz - cz) * 2.0 / radius_mm[0]) ** 2 + ((yy - cy) / radius_mm[1]) ** 2
              + ((xx - cx) / radius_mm[2]) ** 2) <= 1.0
    arr[inside] = 1.0
    return arr, inside


def test_pointing_game_in_3d_on_an_oblique_ct(trained):
    import torch

    rng = np.random.default_rng(3)
    arr, inside = phantom_volume(rng, (6, 22, 30))
    vol = make_volume(arr, spacing=(1.0, 1.0, 2.0), direction=OBLIQUE)
    batch, _ = make_batch(vol, PreprocessSpec(size=48, channels=1), skip=(0, 11))
    with torch.no_grad():
        t = torch.from_numpy(batch.tensors)
        feats = trained.features(t)
        logits = trained.fc(feats.mean(dim=(2, 3)))
    preds = SlicePredictions(labels=LABELS, logits=logits.numpy(),
                             probabilities=torch.softmax(logits, 1).numpy(),
                             features=feats.numpy(), head_weight=trained.fc.weight.detach().numpy(),
                             head_bias=trained.fc.bias.detach().numpy(), batch=batch)
    cams = gradcam(preds)
    img = cams.volumes["lesion"]
    assert img.GetDirection() == vol.image.GetDirection() and img.GetSize() == vol.image.GetSize()
    a = sitk.GetArrayFromImage(img)
    peak = np.unravel_index(np.argmax(a), a.shape)
    assert inside[peak], f"3D CAM peak {peak} is not in the lesion"


def test_faithfulness_beats_random_order(trained):
    import torch

    from dicompipe.explain import deletion_insertion, volume_faithfulness

    rng = np.random.default_rng(4)
    xs = np.stack([to_input(phantom_slice(rng, lesion_position(rng))) for _ in range(4)])
    with torch.no_grad():
        feats = trained.features(torch.from_numpy(xs))
        logits = trained.fc(feats.mean(dim=(2, 3)))
    preds = SlicePredictions(labels=LABELS, logits=logits.numpy(),
                             probabilities=torch.softmax(logits, 1).numpy(),
                             features=feats.numpy(), head_weight=trained.fc.weight.detach().numpy(),
                             head_bias=trained.fc.bias.detach().numpy(), batch=None)
    from dicompipe.types import SliceBatch
    preds.batch = SliceBatch(tensors=xs, slices=[], spec=PreprocessSpec(size=48, channels=1),
                             grid=None, pad=(4, 0, 48), volume=None)
    cams = gradcam(preds)
    f = volume_faithfulness(trained, preds, cams, "lesion", steps=12, baseline=0.0)
    assert cams.faithfulness is f and f["n_slices"] == 4
    assert f["deletion_auc"] < f["deletion_auc_random"]
    assert f["insertion_auc"] > f["insertion_auc_random"]
    r = deletion_insertion(trained, xs[:1], cams.maps[:1, 1], 1, steps=4, baseline="blur")
    assert r["deletion_curve"].shape == (5,) and r["fractions"][-1] == 1.0


def test_randomisation_check_maps_change(trained):
    from dicompipe.explain import randomisation_check

    rng = np.random.default_rng(5)
    xs = np.stack([to_input(phantom_slice(rng, lesion_position(rng))) for _ in range(3)])
    rho = randomisation_check(trained, xs, classes=[1], layers=("fc", "layer4"))
    assert set(rho) == {"fc", "layer4"}
    assert rho["layer4"] < 0.5                       # weights randomised: the map is different
    with pytest.raises(ModelError, match="layer3"):
        randomisation_check(trained, xs, layers=("fc", "layer3"))


def test_spearman_is_a_rank_correlation():
    from dicompipe.explain.faithfulness import spearman

    a = np.arange(16.0).reshape(4, 4)
    assert spearman(a, a ** 3) == pytest.approx(1.0)          # monotone transform: identical ranks
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.zeros_like(a)))            # a flat map has no ranking
