"""Inference backends: callables ``x (N, C, H, W) float32 -> (logits (N, K), layer4 (N, 2048, h, w))``.

"torch" runs the bundle's network (inference_mode, channels_last, fp32); "onnx" uses
ONNX Runtime (:mod:`dicompipe.model.onnx_backend`, extra ``fast``) and "openvino" OpenVINO
(:mod:`dicompipe.model.openvino_backend`, extra ``openvino``) on the same exported file;
"auto" takes the fastest fp32 one installed on CPU (OpenVINO, ONNX Runtime, torch) and torch
on a GPU. Reduced precision (``*-int8``, ``openvino-bf16``) is never chosen automatically.

Example::

    >>> run = get_backend(bundle, "torch", "cpu")
    >>> logits, layer4 = run(np.zeros((2, 3, 224, 224), np.float32))
    >>> run.name, run.device
    ('torch', 'cpu')
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicompipe.errors import ModelError

if TYPE_CHECKING:
    import torch


def _gpu_driver() -> bool:
    """Whether an NVIDIA or AMD GPU driver is present (cheap: no torch import)."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd"))


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a CUDA device is present, else "cpu"; checks explicit choices.
    Without a GPU driver on the machine "auto" is "cpu" without importing torch."""
    if device in (None, "", "auto"):
        if "torch" not in sys.modules and not _gpu_driver():
            return "cpu"
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ModelError(f"Device {device!r} was asked for but no CUDA GPU is available to "
                             "this torch build; use --device cpu (or auto).")
        return str(device)
    if device != "cpu":
        raise ModelError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N.")
    return "cpu"


class TorchBackend:
    """The bundle's ResNet50 in torch: fp32, eval, channels_last, no autograd.

    On CPU the batch norms are folded into the convolutions (:func:`fold_batchnorm`: same
    network and numbers within float rounding, about 25% faster); the bundle's own module
    is never changed.
    """

    name = "torch"

    def __init__(self, bundle, device: str = "cpu", fuse_bn: bool = True):
        import torch

        from dicompipe.model.network import WithFeatures
        self.device = resolve_device(device)
        net = copy.deepcopy(bundle.network()).eval()
        if self.device == "cpu" and fuse_bn:
            fold_batchnorm(net)
        self.net = WithFeatures(net).to(self.device, memory_format=torch.channels_last).eval()

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(
                self.device, memory_format=torch.channels_last)
            logits, a = self.net(t)
            return (logits.float().cpu().numpy(),
                    a.float().contiguous().cpu().numpy())


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place.

    ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``. Works on
    the MONAI ResNet's layout: ``convN``/``bnN`` attribute pairs (stem and bottlenecks) and
    ``downsample = Sequential(conv, bn)``. Each folded BN becomes Identity.

    >>> fast = fold_batchnorm(copy.deepcopy(bundle.network()))
    """
    import torch
    conv_t, bn_t = torch.nn.Conv2d, torch.nn.BatchNorm2d
    pairs = []
    for module in net.modules():
        kids = module._modules
        if isinstance(module, torch.nn.Sequential):
            names = list(kids)
            pairs += [(module, a, b) for a, b in zip(names, names[1:])
                      if isinstance(kids[a], conv_t) and isinstance(kids[b], bn_t)]
        else:
            pairs += [(module, a, "bn" + a[4:]) for a in kids
                      if a.startswith("conv") and isinstance(kids[a], conv_t)
                      and isinstance(kids.get("bn" + a[4:]), bn_t)]
    with torch.no_grad():
        for module, cname, bname in pairs:
            conv, bn = module._modules[cname], module._modules[bname]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            module._modules[bname] = torch.nn.Identity()
    return net


BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8")


def get_backend(bundle, name: str = "auto", device: str = "auto"):
    """An inference callable for ``bundle``, built once per bundle, backend and device.

    ``name``: "auto" (on CPU the fastest fp32 runtime installed: OpenVINO, else ONNX
    Runtime, else torch; torch on a GPU),
    "torch", "onnx", "onnx-int8", "openvino", "openvino-bf16" or "openvino-int8". The int8
    backends need a bundle that ships a validated int8 calibration; bf16 needs a CPU with
    native bfloat16. ``device`` as for torch.
    """
    dev = resolve_device(device)
    if name not in BACKENDS:
        raise ModelError(f"Unknown backend {name!r}: use {', '.join(BACKENDS)}.")
    auto = name == "auto"
    if auto:
        name = "torch" if dev != "cpu" else ("openvino" if _installed("openvino") else "onnx")
    cache = getattr(bundle, "_backends", None)
    if cache is not None and (name, dev) in cache:
        return cache[(name, dev)]
    family, _, precision = name.partition("-")
    if family == "torch":
        run = TorchBackend(bundle, dev)
    else:
        try:
            if family == "onnx":
                if not _installed("onnxruntime"):     # onnx_backend imports it on use
                    raise ImportError("onnxruntime is not installed")
                from dicompipe.model.onnx_backend import OnnxBackend as Backend
            else:
                from dicompipe.model.openvino_backend import OpenVinoBackend as Backend
        except ImportError as e:
            if auto:
                return get_backend(bundle, "torch", dev)          # auto without the extra
            extra = "fast" if family == "onnx" else "openvino"
            raise ModelError(f"The {family} backend is not available ({e}). Install the extra "
                             f"`pip install dicompipe[{extra}]` or use --backend torch.") from e
        run = Backend(bundle, dev, precision or "fp32")
    if cache is not None:
        cache[(name, dev)] = run
    return run


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None
