"""Rendering one model slice: window -> square pad -> resize -> normalise.

Training and inference both call :func:`render`, so a bundle's images look the same in
both. Already-windowed 8-bit input (PNG/JPG) is scaled to [0, 1], never windowed again.

Example::

    >>> x = render(hu_slice, spec)          # float32 (spec.channels, 224, 224)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dicompipe.types import PreprocessSpec


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU -> [0, 1] for a (level, width) display window."""
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float32) - lo) / float(width), 0.0, 1.0)


def square_pad(img: np.ndarray, fill: float = 0.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Centre (..., y, x) in a side x side square (never stretch). Returns (square, (y0, x0, side))."""
    ny, nx = img.shape[-2:]
    side = max(ny, nx)
    y0, x0 = (side - ny) // 2, (side - nx) // 2
    out = np.full(img.shape[:-2] + (side, side), fill, dtype=img.dtype)
    out[..., y0:y0 + ny, x0:x0 + nx] = img
    return out, (y0, x0, side)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """(C, s, s) -> (C, size, size), bilinear with antialiasing when shrinking."""
    if img.shape[-1] == size and img.shape[-2] == size:
        return img.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=img.shape[-1] > size)
    return out[0].numpy()


def channels(stack: np.ndarray, spec: PreprocessSpec, windowed: bool) -> np.ndarray:
    """Model channels in [0, 1] from a slice (y, x) or neighbour stack (3, y, x).

    "windows" mode: one channel per window of the centre slice (repeated up to
    ``spec.channels``); "neighbours" mode: slices z-1, z, z+1 under the first window.
    """
    stack = np.asarray(stack)
    if stack.ndim == 2:
        stack = stack[None]
    if spec.channel_mode == "neighbours":
        if stack.shape[0] != spec.channels:
            raise ValueError(f"neighbours mode needs {spec.channels} slices, got {stack.shape[0]}")
        layers = [stack[i] / 255.0 if windowed else window(stack[i], *spec.windows[0])
                  for i in range(spec.channels)]
    else:
        centre = stack[stack.shape[0] // 2]
        if windowed:
            layers = [centre.astype(np.float32) / 255.0]
        else:
            layers = [window(centre, lvl, wid) for lvl, wid in spec.windows]
        layers = [layers[i % len(layers)] for i in range(spec.channels)]
    return np.stack(layers).astype(np.float32, copy=False)


def render(stack: np.ndarray, spec: PreprocessSpec, windowed: bool = False) -> np.ndarray:
    """One model input (spec.channels, size, size), normalised: window, pad, resize, (x-mean)/std."""
    sq, _ = square_pad(channels(stack, spec, windowed))
    return (resize(sq, spec.size) - spec.mean) / spec.std
