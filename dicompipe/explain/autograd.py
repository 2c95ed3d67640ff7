"""Grad-CAM and Grad-CAM++ through autograd (hooks on a target layer), for any head.

This is the general path: a forward hook keeps the target layer's activations, and
``torch.autograd.grad`` of each class score (the logit, as pytorch-grad-cam's
``ClassifierOutputTarget(c)`` takes it) gives their gradients. The channel weights follow
pytorch-grad-cam exactly: Grad-CAM uses the spatial mean of the gradients; Grad-CAM++ its
eq. 19 form with ``eps = 1e-6``. Maps are returned raw (ReLU applied, not normalised);
:func:`dicompipe.explain.gradcam.normalise_like_grad_cam` applies pytorch-grad-cam's
post-processing. On the standard ResNet head it agrees with the closed form (tested).

Example::

    >>> net = resnet50(num_classes=3).eval()
    >>> maps = autograd_cam(net, x)                     # (n, 3, 7, 7), layer4[-1]
    >>> maps_pp = autograd_cam(net, x, method="gradcam++")
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dicompipe.errors import ModelError
from dicompipe.explain.gradcam import GRADCAM_PP_EPS, METHODS


def default_target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """``model.layer4[-1]`` (the last bottleneck of a ResNet), as pytorch-grad-cam's examples use."""
    net = getattr(model, "net", model)          # WithFeatures wrapper
    layer4 = getattr(net, "layer4", None)
    if layer4 is None:
        raise ModelError(
            f"{type(model).__name__} has no layer4: pass target_layer= (the last conv block).")
    return layer4[-1] if isinstance(layer4, torch.nn.Sequential) else layer4


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def autograd_cam(model: torch.nn.Module, x, classes: Sequence[int] | None = None, *,
                 target_layer: torch.nn.Module | None = None, method: str = "gradcam",
                 batch_size: int = 16, eps: float = GRADCAM_PP_EPS) -> np.ndarray:
    """Raw CAMs (n, K, h, w) by autograd for inputs ``x`` (n, C, H, W) and class indices.

    One forward per batch; one ``autograd.grad`` per class on that graph. ``model`` may
    return logits or ``(logits, features)``. The model is put in eval mode.

    Example::

        >>> autograd_cam(net, torch.randn(2, 3, 224, 224), classes=[2]).shape
        (2, 1, 7, 7)
    """
    if method not in METHODS:
        raise ValueError(f"Unknown CAM method {method!r}: choose one of {', '.join(METHODS)}.")
    layer = target_layer if target_layer is not None else default_target_layer(model)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    model.eval()
    device = next(model.parameters()).device
    kept: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: kept.append(o))
    out_maps = []
    try:
        for start in range(0, len(x), batch_size):
            kept.clear()
            # an input that requires grad makes layer activations differentiable even when
            # the model's parameters are frozen (only d score / d activation is computed)
            xb = x[start:start + batch_size].to(device).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = _logits(model(xb))
                if not kept:
                    raise ModelError("The target layer was not reached in the forward pass.")
                act = kept[-1]
                ks = list(range(logits.shape[1])) if classes is None else [int(c) for c in classes]
                batch_maps = []
                for j, c in enumerate(ks):
                    (grad,) = torch.autograd.grad(logits[:, c].sum(), act,
                                                  retain_graph=j < len(ks) - 1)
                    batch_maps.append(_cam_from(act.detach(), grad.detach(), method, eps))
            out_maps.append(torch.stack(batch_maps, 1).cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(out_maps).astype(np.float32) if out_maps else np.zeros((0,), np.float32)


def _cam_from(act: torch.Tensor, grad: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    """(n, h, w) ReLU(sum_k alpha_k A_k) with pytorch-grad-cam's channel weights."""
    if method == "gradcam":
        weights = grad.mean(dim=(2, 3))
    else:
        g2 = grad * grad
        s = act.sum(dim=(2, 3))[:, :, None, None]
        aij = g2 / (2 * g2 + s * g2 * grad + eps)
        aij = torch.where(grad != 0, aij, torch.zeros_like(aij))
        weights = (torch.clamp(grad, min=0) * aij).sum(dim=(2, 3))
    return torch.relu((weights[:, :, None, None] * act).sum(1))
