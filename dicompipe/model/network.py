"""The ResNet50 classifier (docs/architecture.md): MONAI ResNet, Bottleneck [3, 4, 6, 3], 2D,
``conv1_t_stride=2`` (standard ImageNet topology, 4.1 GMAC at 224, layer4 7x7).

Layer names match torchvision's resnet50, so an ImageNet state dict loads by name.

Example::

    >>> net = resnet50(num_classes=3)
    >>> logits, layer4 = forward_with_features(net, torch.zeros(1, 3, 224, 224))
    >>> layer4.shape
    torch.Size([1, 2048, 7, 7])
"""
from __future__ import annotations

import torch
from monai.networks.nets import ResNet


class _ResNet50(ResNet):
    """MONAI's ResNet whose ``forward`` pools the class logits as :func:`class_logits` does
    (``net(x)`` and the exported :class:`WithFeatures` agree for every head)."""
    abnormal_top = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_with_features(self, x)[0]


def resnet50(num_classes: int, in_channels: int = 3, zero_init_residual: bool = False,
             layer4_dilation: int = 1, abnormal_top: float = 0.0) -> ResNet:
    """A standard-topology ResNet50 (stride-2 stem, no bias in downsample convs).

    ``zero_init_residual`` starts each block's last BatchNorm at gamma 0, so every residual
    block begins as the identity (Goyal et al. 2017): steadier training from scratch.
    ``layer4_dilation=2`` keeps layer4 at stride 16 (dilated convolutions instead of the
    last downsampling, as torchvision's ``replace_stride_with_dilation``): the class map
    and Grad-CAM get 2x finer (10 x 10 cells at 160 px) for ~1.6x the FLOPs (1.3x the
    torch forward time measured at 160 px, batch 16, 2 CPU threads); same weight shapes.
    ``abnormal_top``: see :func:`class_logits` (0 = the standard global average).
    """
    net = _ResNet50("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512], spatial_dims=2,
                    n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2,
                    num_classes=num_classes, bias_downsample=False)
    if zero_init_residual:
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                torch.nn.init.zeros_(block.bn3.weight)
    if layer4_dilation != 1:
        dilate_layer4(net, layer4_dilation)
    net.abnormal_top = float(abnormal_top)
    return net


def dilate_layer4(net: ResNet, dilation: int = 2) -> None:
    """Replace layer4's stride 2 by ``dilation`` in place (first block strided -> 1, later
    blocks' 3x3 convolutions dilated), so layer4 keeps layer3's resolution."""
    first = net.layer4[0]
    first.conv2.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    for block in list(net.layer4)[1:]:
        block.conv2.dilation = (dilation, dilation)
        block.conv2.padding = (dilation, dilation)


def cell_logits(net: ResNet, a: torch.Tensor) -> torch.Tensor:
    """Per-cell class logits (n, k, h, w) from layer4 ``a``: the class maps that Grad-CAM
    shows (``w_c . A_ij + b_c``); their mean over cells is a standard head's class logit."""
    return torch.einsum("nchw,kc->nkhw", a, net.fc.weight) + net.fc.bias[None, :, None, None]


def class_logits(net: ResNet, a: torch.Tensor) -> torch.Tensor:
    """The class logits from layer4 ``a``: the global average of each class map, or, when
    ``net.abnormal_top`` > 0, for every class but the first (normal) the mean of its top
    ``abnormal_top`` share of cells (MIL-style evidence pooling: a small lesion counts as
    much as a large one; normal stays the global average).

    >>> net.abnormal_top = 0.05          # 10 x 10 cells: each abnormal logit = its 5 best cells
    """
    top = float(getattr(net, "abnormal_top", 0.0))
    if not top:
        return net.fc(torch.flatten(net.avgpool(a), 1))
    cells = torch.flatten(cell_logits(net, a), 2)                       # (n, k, h*w)
    # tensor arithmetic, not Python ints: the ONNX export keeps the cell count dynamic
    ranked = cells[:, 1:].sort(-1, descending=True).values
    rank = torch.arange(ranked.shape[-1], device=a.device).to(ranked.dtype)
    m = (torch.as_tensor(ranked.shape[-1]).to(ranked.dtype) * top).round().clamp(min=1)
    abnormal = (ranked * (rank < m)).sum(-1) / m
    return torch.cat([cells[:, :1].mean(-1), abnormal], 1)


def forward_with_features(net: ResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass returning (logits, layer4 activations) — layer4 feeds Grad-CAM."""
    x = net.maxpool(net.act(net.bn1(net.conv1(x))))
    a = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return class_logits(net, a), a


class WithFeatures(torch.nn.Module):
    """Wrapper whose forward returns (logits, layer4): used for ONNX export and backends."""

    def __init__(self, net: ResNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        return forward_with_features(self.net, x)


def load_torchvision_weights(net: ResNet, state_dict: dict, *, skip_head: bool = True) -> list[str]:
    """Load a torchvision resnet50 state dict by name (e.g. ImageNet weights a user has).

    The head (``fc``) is skipped by default since class counts differ; a 1-channel stem
    gets the RGB kernels summed. Returns the names that were not loaded.
    """
    own = net.state_dict()
    take, missing = {}, []
    for k, v in state_dict.items():
        if skip_head and k.startswith("fc."):
            continue
        if k not in own:
            missing.append(k)
            continue
        if k == "conv1.weight" and v.shape[1] != own[k].shape[1]:
            v = v.sum(1, keepdim=True).repeat(1, own[k].shape[1], 1, 1) / own[k].shape[1]
        if v.shape != own[k].shape:
            missing.append(k)
            continue
        take[k] = v
    net.load_state_dict(take, strict=False)
    return missing + [k for k in own if k not in take and not k.startswith("fc.")]
