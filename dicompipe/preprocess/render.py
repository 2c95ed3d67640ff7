"""Rendering one model slice: window (or transfer) -> body mask and crop -> square pad ->
resize -> normalise.

Training and inference both call :func:`render`, so a bundle's images look the same in
both. Already-windowed 8-bit input (PNG/JPG) is scaled to [0, 1], never windowed again.
With ``spec.body_mask`` the patient is cut out (``preprocess.body``) and, with ``crop``,
the image is cropped to the body; ``prepare`` crops the whole grid once instead, so that
every slice of a volume shares one geometry.

Example::

    >>> x = render(hu_slice, spec)          # float32 (spec.channels, 224, 224)
"""
from __future__ import annotations

import numpy as np

from dicompipe.preprocess import resize as _resize
from dicompipe.preprocess.body import body_box, body_mask, to_u8
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
    """(C, s, s) -> (C, size, size), bilinear with antialiasing when shrinking (torch's
    numbers, :mod:`dicompipe.preprocess.resize`); repeated channels are resized once."""
    img = np.asarray(img, np.float32)
    if img.shape[-1] == size and img.shape[-2] == size:
        return img
    if img.ndim == 3 and len(img) > 1 and all(np.array_equal(img[0], c) for c in img[1:]):
        one = _resize.resize(img[:1], (size, size))
        return np.repeat(one, len(img), axis=0)
    return _resize.resize(img, (size, size))


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
        layers = [stack[i] / 255.0 if windowed else _model_window(stack[i], spec, 0)
                  for i in range(spec.channels)]
    else:
        centre = stack[stack.shape[0] // 2]
        if windowed:
            layers = [centre.astype(np.float32) / 255.0]
        elif spec.transfer:
            layers = [_model_window(centre, spec, 0)]
        else:
            layers = [window(centre, lvl, wid) for lvl, wid in spec.windows]
        layers = [layers[i % len(layers)] for i in range(spec.channels)]
    return np.stack(layers).astype(np.float32, copy=False)


def model_gray(slice_: np.ndarray, spec: PreprocessSpec, windowed: bool) -> np.ndarray:
    """One slice in the model's first grey channel, [0, 1] (the image the body mask sees)."""
    if windowed:
        return np.asarray(slice_, np.float32) / 255.0
    return _model_window(slice_, spec, 0)


def _model_window(hu: np.ndarray, spec: PreprocessSpec, i: int) -> np.ndarray:
    if spec.transfer:
        return to_u8(hu, spec.transfer) / np.float32(255.0)
    return window(hu, *spec.windows[i])


def equalize(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rank-equalise ``img`` (values in [0, 1]) inside ``mask`` to (0, 1]; 0 outside.

    Mid-ranks over 256 levels: any monotone transfer of the same image gives the same output.

    >>> equalize(np.array([[0.1, 0.5], [0.9, 0.0]]), np.array([[1, 1], [1, 0]], bool)).round(2)
    array([[0.17, 0.5 ],
           [0.83, 0.  ]], dtype=float32)
    """
    q = np.clip(np.rint(img * 255.0), 0, 255).astype(np.intp)
    hist = np.bincount(q[mask], minlength=256).astype(np.float64)
    n = hist.sum()
    if n == 0:
        return np.zeros_like(img, dtype=np.float32)
    cdf = (np.cumsum(hist) - hist / 2.0) / n
    return np.where(mask, cdf[q], 0.0).astype(np.float32)


def body_layers(layers: np.ndarray, spec: PreprocessSpec, crop: bool) -> np.ndarray:
    """(C, y, x) in [0, 1] -> the same with the outside of the body zeroed (and equalised,
    and cropped to the body when ``crop``), per ``spec``."""
    if not spec.body_mask:
        return layers
    m = body_mask(layers[len(layers) // 2] * 255.0, spec.mask_threshold, spec.mask_adaptive)
    if not m.any():
        return layers
    if spec.equalize:
        layers = np.stack([equalize(c, m) for c in layers])
    else:
        layers = layers * m
    if crop:
        y0, y1, x0, x1 = body_box(m, spec.crop_margin)
        layers = layers[:, y0:y1, x0:x1]
    return layers


def render(stack: np.ndarray, spec: PreprocessSpec, windowed: bool = False,
           crop: bool = True) -> np.ndarray:
    """One model input (spec.channels, size, size), normalised: window, body mask/crop, pad,
    resize, (x-mean)/std. ``crop=False`` when the caller has cropped to the body already."""
    sq, _ = square_pad(body_layers(channels(stack, spec, windowed), spec, crop))
    return (resize(sq, spec.size) - spec.mean) / spec.std
