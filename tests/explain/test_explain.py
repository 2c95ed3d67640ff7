"""Grad-CAM: closed form == autograd == a pytorch-grad-cam-style reference; CamStack; 3D maps.

pytorch-grad-cam cannot be installed here (it pulls torchvision and a CUDA torch), so the
reference below re-implements what its ``GradCAM(model, target_layers=[model.layer4[-1]])``
with ``ClassifierOutputTarget(c)`` does, step by step and independently of dicompipe:
a tensor hook collects the gradient of ``output[c]`` w.r.t. layer4[-1]'s output, weights =
``np.mean(grads, axis=(2, 3))``, cam = ReLU(sum(weights * activations)), then
``scale_cam_image`` (min-max, bilinear resize with half-pixel centres and edge clamping —
cv2.INTER_LINEAR there, scikit-image order=1 here — then min-max again).
"""
from __future__ import annotations

import numpy as np
import pytest
from geometry import OBLIQUE, blob, make_batch, make_volume
from skimage.transform import resize as sk_resize

from dicompipe.errors import ModelError
from dicompipe.explain import class_maps, gradcam, normalise_like_grad_cam
from dicompipe.types import PreprocessSpec, SlicePredictions

SIZE = 160      # the standard ResNet50; 160 (layer4 5x5) instead of 224 (7x7) keeps CPU tests fast


@pytest.fixture(scope="module")
def resnet_case():
    import torch  # torch and MONAI are imported by the tests that use them, not at collection

    from dicompipe.model.network import forward_with_features, resnet50

    torch.manual_seed(0)
    net = resnet50(num_classes=3).eval()
    with torch.no_grad():                        # a head with clearly different class rows
        net.fc.weight.normal_(0, 0.05)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits, feats = forward_with_features(net, x)
    return net, x, logits.numpy(), feats.numpy()


def reference_gradcam(model, x, classes, size):
    """pytorch-grad-cam's GradCAM + ClassifierOutputTarget(c) + scale_cam_image, re-done.

    Returns {c: (n, size, size)}. One forward, one backward per class (the forward is
    deterministic in eval mode, so this equals one GradCAM call per class).
    """
    acts, grads = [], []

    def hook(module, inputs, output):
        acts.append(output.detach().numpy())
        output.register_hook(lambda g: grads.append(g.detach().numpy()))

    h = model.layer4[-1].register_forward_hook(hook)
    # test speed only: parameter gradients below layer4[-1] do not change d output / d layer4
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in model.layer4[-1].parameters():
        p.requires_grad_(True)
    try:
        outputs = model(x)
        for c in classes:
            model.zero_grad()
            loss = sum(out[c] for out in outputs)
            loss.backward(retain_graph=True)
    finally:
        h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad()

    def scale(imgs, target=None):
        out = []
        for img in imgs:
            img = img - np.min(img)
            img = img / (1e-7 + np.max(img))
            if target is not None:
                img = sk_resize(img, target, order=1, mode="edge", anti_aliasing=False)
            out.append(img)
        return np.float32(out)

    result = {}
    for c, g in zip(classes, grads):
        weights = np.mean(g, axis=(2, 3))
        cam = np.maximum((weights[:, :, None, None] * acts[0]).sum(axis=1), 0)
        result[c] = scale(scale(cam, (size, size)))
    return result


def test_closed_form_matches_pytorch_grad_cam_reference(resnet_case):
    net, x, _, feats = resnet_case
    ours = class_maps(feats, net.fc.weight.detach().numpy())          # (2, 3, 5, 5)
    assert ours.shape == (2, 3, 5, 5) and ours.max() > 0
    refs = reference_gradcam(net, x, [0, 1, 2], SIZE)
    for c in range(3):
        mine = normalise_like_grad_cam(ours[:, c], SIZE)
        assert mine.shape == refs[c].shape == (2, SIZE, SIZE)
        assert np.abs(mine - refs[c]).max() < 1e-4


def test_closed_form_equals_autograd_raw_and_normalised(resnet_case):
    from dicompipe.explain import autograd_cam

    net, x, _, feats = resnet_case
    w = net.fc.weight.detach().numpy()
    hw = feats.shape[2] * feats.shape[3]
    for method in ("gradcam", "gradcam++"):
        closed = class_maps(feats, w, method)
        auto = autograd_cam(net, x, method=method)
        assert auto.shape == closed.shape == (2, 3, 5, 5)
        factor = hw if method == "gradcam" else 1.0        # Grad-CAM weights are w / (H*W)
        assert np.allclose(auto * factor, closed, rtol=1e-4, atol=1e-5 * closed.max())
        assert np.abs(normalise_like_grad_cam(closed, SIZE)
                      - normalise_like_grad_cam(auto, SIZE)).max() < 1e-4
    # Grad-CAM++ is a different map from Grad-CAM, not a relabelling
    assert not np.allclose(normalise_like_grad_cam(class_maps(feats, w), 5),
                           normalise_like_grad_cam(class_maps(feats, w, "gradcam++"), 5), atol=1e-3)


def test_autograd_on_wrapped_model_and_general_head(resnet_case):
    import torch

    from dicompipe.explain import autograd_cam
    from dicompipe.model.network import forward_with_features

    net, x, _, feats = resnet_case

    class TwoLayerHead(torch.nn.Module):           # not GAP+linear: closed form does not hold
        def __init__(self):
            super().__init__()
            self.net = net
            self.hidden = torch.nn.Linear(2048, 8)
            self.out = torch.nn.Linear(8, 2)

        def forward(self, inp):
            _, a = forward_with_features(self.net, inp)
            return self.out(torch.relu(self.hidden(a.amax(dim=(2, 3)))))

    torch.manual_seed(1)
    m = TwoLayerHead()
    maps = autograd_cam(m, x[:1], classes=[1])
    assert maps.shape == (1, 1, 5, 5) and np.all(maps >= 0) and maps.max() > 0


def make_predictions(batch, net_features, head, labels):
    """SlicePredictions as model.predict returns them, from a features function and a head."""
    import torch

    with torch.no_grad():
        feats = net_features(torch.from_numpy(batch.tensors))
        logits = head(feats.mean(dim=(2, 3)))
    return SlicePredictions(
        labels=labels, logits=logits.numpy(), probabilities=torch.softmax(logits, 1).numpy(),
        features=feats.numpy(), head_weight=head.weight.detach().numpy(),
        head_bias=head.bias.detach().numpy(), batch=batch)


def test_gradcam_stack_scale_display_and_volumes():
    import torch

    arr = blob((10, 20, 28), (5, 9, 14), (2, 4, 5)) * 100.0
    vol = make_volume(arr, spacing=(0.9, 0.9, 2.0), direction=OBLIQUE)
    batch, _ = make_batch(vol, PreprocessSpec(size=32, spacing=1.2, slab_mm=2.5), skip=(0,))
    batch.tensors = np.repeat(batch.tensors, 3, axis=1)          # C = 3
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=4, padding=1), torch.nn.ReLU())
    head = torch.nn.Linear(16, 3)
    preds = make_predictions(batch, body, head, ["normal", "benign", "malignant"])

    cams = gradcam(preds)
    n = len(batch.included)
    assert cams.labels == ["normal", "benign", "malignant"] and cams.method == "gradcam"
    assert cams.maps.shape == (n, 3, 8, 8) and cams.maps.dtype == np.float32
    assert np.allclose(cams.maps, class_maps(preds.features, preds.head_weight))
    for k, label in enumerate(cams.labels):
        assert cams.scale[label] == pytest.approx(float(cams.maps[:, k].max()))
        d = np.stack([cams.display(r, label) for r in range(n)])
        assert d.max() <= 1.0 and d.min() >= 0.0
        # one scale per volume: a faint slice stays faint, per-slice scaling makes it hot
        faint = int(np.argmin(cams.maps[:, k].max(axis=(1, 2))))
        if cams.maps[faint, k].max() > 0:
            assert cams.display(faint, label, per_slice=True).max() == pytest.approx(1.0)
        img = cams.volumes[label]
        assert img.GetSize() == vol.image.GetSize()
        assert img.GetOrigin() == vol.image.GetOrigin()
        assert img.GetDirection() == vol.image.GetDirection()

    sub = gradcam(preds, classes=["malignant"], method="gradcam++", volumes=False)
    assert sub.labels == ["malignant"] and sub.maps.shape == (n, 1, 8, 8) and not sub.volumes
    assert np.allclose(sub.maps[:, 0], class_maps(preds.features, preds.head_weight,
                                                   "gradcam++")[:, 2])
    with pytest.raises(ModelError, match="Unknown class"):
        gradcam(preds, classes=["tumour"])
    preds.features = None
    with pytest.raises(ModelError, match="no layer4 features"):
        gradcam(preds)


def test_autograd_with_frozen_parameters_equals_closed_form():
    import torch

    from dicompipe.explain import autograd_cam

    torch.manual_seed(3)
    net = torch.nn.Module()
    net.layer4 = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, stride=2, padding=1), torch.nn.ReLU())
    net.fc = torch.nn.Linear(6, 2)
    net.forward = lambda x: net.fc(net.layer4(x).mean(dim=(2, 3)))
    for p in net.parameters():
        p.requires_grad_(False)                     # e.g. a model loaded for inference only
    x = torch.randn(3, 1, 16, 16)
    maps = autograd_cam(net, x)
    with torch.no_grad():
        feats = net.layer4(x).numpy()
    closed = class_maps(feats, net.fc.weight.numpy())
    assert maps.shape == closed.shape == (3, 2, 8, 8)
    assert np.allclose(maps * 64, closed, rtol=1e-4, atol=1e-6 * max(1.0, closed.max()))
