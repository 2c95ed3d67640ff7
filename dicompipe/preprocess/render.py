"""Rendering one model slice: window (or transfer) -> body mask and crop -> square pad ->
(lung-only region) -> resize -> normalise.

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
from dicompipe.preprocess.region import GRAY_SIDE, lung_only
from dicompipe.types import INPUT_REGIONS, PreprocessSpec


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
    return _stack(_layers(stack, spec, windowed), spec.channels)


def _stack(layers: list[np.ndarray], n: int) -> np.ndarray:
    return np.stack([layers[i % len(layers)] for i in range(n)]).astype(np.float32, copy=False)


def _layers(stack: np.ndarray, spec: PreprocessSpec, windowed: bool) -> list[np.ndarray]:
    """The distinct channels of :func:`channels` (one when they are all the same image)."""
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
    return layers


def model_gray(slice_: np.ndarray, spec: PreprocessSpec, windowed: bool) -> np.ndarray:
    """One slice in the model's first grey channel, [0, 1] (the image the body mask sees)."""
    if windowed:
        return np.asarray(slice_, np.float32) / 255.0
    return _model_window(slice_, spec, 0)


def model_foreground(slice_: np.ndarray, spec: PreprocessSpec, windowed: bool) -> np.ndarray:
    """``model_gray(slice_) * 255 > spec.mask_threshold``: the pixels a body mask starts
    from. Under a "floor" transfer whose ramp starts above the threshold that is exactly
    ``HU >= floor``, one comparison instead of the transfer.

    >>> model_foreground(hu, spec, windowed=False).dtype
    dtype('bool')
    """
    t = spec.transfer or {}
    if not windowed and t.get("kind") == "floor" and float(t["low"]) > spec.mask_threshold:
        return np.asarray(slice_) >= np.float32(t["floor_hu"])
    return model_gray(slice_, spec, windowed) * 255.0 > spec.mask_threshold


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


def keep_region(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One square image (256, 256) or (C, 256, 256), in [0, 1] or uint8, with everything
    outside ``spec.input_region`` set to background (0); unchanged when the spec has none.
    The mask comes from the middle channel. Training applies this to its 256 px cache,
    inference (:func:`render`) to the slice resized to 256 px: one mask for both.

    >>> keep_region(cache_u8[0], spec)         # (256, 256) uint8 -> the same, masked
    """
    m = region_mask(image if image.ndim == 2 else image[len(image) // 2], spec)
    return image if m is None else image * m


def region_mask(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray | None:
    """The bool mask (256, 256) of ``spec.input_region`` on one grey image (256, 256), in
    [0, 1] or uint8; None when the spec has no region."""
    if not spec.input_region:
        return None
    if spec.input_region not in INPUT_REGIONS:
        raise ValueError(f"input_region {spec.input_region!r} is not one of {', '.join(INPUT_REGIONS)}")
    if gray.shape[-1] != GRAY_SIDE:
        raise ValueError(f"an input region is found on {GRAY_SIDE} px images, got {gray.shape[-1]}")
    scale = 255.0 if gray.dtype == np.uint8 else 1.0
    return lung_only(gray.astype(np.float32) / scale, spec.region_margin)


def render(stack: np.ndarray, spec: PreprocessSpec, windowed: bool = False,
           crop: bool = True) -> np.ndarray:
    """One model input (spec.channels, size, size), normalised: window, body mask/crop, pad,
    resize, (x-mean)/std. ``crop=False`` when the caller has cropped to the body already."""
    layers = _layers(stack, spec, windowed)
    # one image in every channel (8-bit input, a transfer, one window): rendered once
    one = len(layers) == 1 and spec.channel_mode == "windows"
    x = _stack(layers, 1 if one else spec.channels)
    sq, _ = square_pad(body_layers(x, spec, crop))
    if spec.input_region:
        sq = keep_region(resize(sq, GRAY_SIDE), spec)
    out = (resize(sq, spec.size) - spec.mean) / spec.std
    return np.repeat(out, spec.channels, axis=0) if one else out
