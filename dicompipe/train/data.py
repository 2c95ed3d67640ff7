"""Training/evaluation data: find labelled slices, render them ONCE with the inference
renderer, cache them as uint8, and augment the cached tensors.

Inputs understood by :func:`scan`:

- a class-folder image tree (``Normal cases/``, ``Bengin cases/``... or
  ``train/<class>/`` + ``test/<class>/`` as in the Kaggle pancreas set); folder names are
  mapped to labels by a label map (built-in defaults, or ``--label-map a=b,c=d``);
- a CSV manifest with columns ``path,label`` and optional ``patient_id`` (image files or
  single-slice DICOM files; paths relative to the CSV).

Example::

    >>> items = scan("iq-othnccd/", organ="lung")
    >>> cache = build_cache(items, spec)          # uint8 (n, size, size)
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dicompipe import organs
from dicompipe.errors import DicompipeError
from dicompipe.preprocess.render import render
from dicompipe.types import PreprocessSpec


def labels_of(organ: str) -> list[str]:
    """The organ's class labels, negative first (organ registry, ``training.labels``)."""
    return list(organs.get(organ).training.labels)


def positive_of(organ: str) -> list[str]:
    """The organ's positive labels (organ registry, ``training.positive``)."""
    return list(organs.get(organ).training.positive)
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}

# folder name (lower case) -> label; IQ-OTH/NCCD spells benign "Bengin"
DEFAULT_LABEL_MAP = {
    "normal cases": "normal", "normal": "normal",
    "bengin cases": "benign", "benign cases": "benign", "benign": "benign", "bengin": "benign",
    "malignant cases": "malignant", "malignant": "malignant",
    "pancreatic_tumor": "tumour", "pancreatic_tumour": "tumour", "tumor": "tumour",
    "tumour": "tumour",
}


@dataclass
class Item:
    """One labelled slice."""

    path: str
    label: int
    group: str | None = None        # patient ID when known
    subset: str = ""                # e.g. the source's own "train"/"test" folder
    number: int | None = None       # file number (IQ-OTH/NCCD "(123)")
    shape: tuple[int, int] = (0, 0)
    info: dict = field(default_factory=dict)


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"Bengin cases=benign,Tumor=tumour"`` -> dict (keys lower-cased), merged over defaults."""
    m = dict(DEFAULT_LABEL_MAP)
    if text:
        for part in text.split(","):
            if "=" not in part:
                raise DicompipeError(f"--label-map entry {part!r} is not FOLDER=LABEL.")
            k, v = part.split("=", 1)
            m[k.strip().lower()] = v.strip()
    return m


def _number(name: str) -> int | None:
    nums = re.findall(r"\d+", Path(name).stem)
    return int(nums[-1]) if nums else None


def scan(data, organ: str, label_map: dict[str, str] | None = None) -> tuple[list[Item], list[str]]:
    """Labelled items under ``data`` (folder tree or CSV). Returns (items, labels)."""
    labels = labels_of(organ)
    lm = label_map or DEFAULT_LABEL_MAP
    data = Path(data)
    items: list[Item] = []
    if data.is_file() and data.suffix.lower() == ".csv":
        with open(data, newline="") as f:
            for row in csv.DictReader(f):
                lab = lm.get(row["label"].strip().lower(), row["label"].strip())
                if lab not in labels:
                    raise DicompipeError(f"{data}: label {row['label']!r} is not one of {labels}.")
                p = Path(row["path"])
                p = p if p.is_absolute() else data.parent / p
                items.append(Item(str(p), labels.index(lab), group=row.get("patient_id") or None,
                                  number=_number(p.name)))
    elif data.is_dir():
        for p in sorted(data.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXT and p.suffix.lower() != ".dcm":
                continue
            lab = lm.get(p.parent.name.lower())
            if lab is None or lab not in labels:
                continue
            rel = p.relative_to(data).parts
            subset = rel[0] if len(rel) > 2 else ""
            items.append(Item(str(p), labels.index(lab), subset=subset, number=_number(p.name)))
    else:
        raise DicompipeError(f"Training data {data} is neither a folder nor a .csv manifest.")
    if not items:
        raise DicompipeError(f"No labelled images under {data}: expected class folders "
                             f"({', '.join(sorted(set(lm)))}) or a CSV with path,label.")
    return items, labels


def read_gray(path: str) -> tuple[np.ndarray, bool, dict]:
    """(pixels, windowed, info): 8-bit grey for images, HU for a DICOM slice."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        import pydicom
        ds = pydicom.dcmread(str(p))
        hu = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) \
            + float(getattr(ds, "RescaleIntercept", 0) or 0)
        return hu, False, {"mode": "dicom"}
    from PIL import Image
    with Image.open(p) as im:
        mode = im.mode
        a = np.asarray(im.convert("RGB")) if mode not in ("L", "I;16", "I") else np.asarray(im)
    info = {"mode": mode}
    if a.ndim == 3:
        info["colour"] = bool(np.abs(a.astype(np.int16) - a[..., :1]).max() > 8)
        a = (0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2])
    return a.astype(np.float32), True, info


def to_cache(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Rendered (C, s, s) normalised -> uint8 (s, s) of the first channel (channels are
    copies of one grey window here)."""
    v = x[0] * spec.std + spec.mean
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)


def build_cache(items: list[Item], spec: PreprocessSpec, cache_file: str | Path | None = None,
                log=print) -> np.ndarray:
    """Render every item once with :func:`dicompipe.preprocess.render.render` -> uint8 (n, s, s).

    Also fills ``item.shape``/``item.info``. With ``cache_file`` the result is stored/reused
    (keyed on the file list and spec).
    """
    key = repr(([it.path for it in items], spec.to_dict()))
    if cache_file and Path(cache_file).exists():
        z = np.load(cache_file, allow_pickle=False)
        if str(z["key"]) == key:
            for it, sh, mo in zip(items, z["shapes"], z["modes"]):
                it.shape = tuple(int(v) for v in sh)
                it.info = {"mode": str(mo)}
            return z["images"]
    out = np.zeros((len(items), spec.size, spec.size), np.uint8)
    for i, it in enumerate(items):
        a, windowed, info = read_gray(it.path)
        it.shape, it.info = tuple(a.shape), info
        out[i] = to_cache(render(a, spec, windowed=windowed), spec)
        if log and (i + 1) % 200 == 0:
            log(f"rendered {i + 1}/{len(items)}")
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, key=np.array(key), images=out,
                 shapes=np.array([it.shape[:2] for it in items]),
                 modes=np.array([it.info.get("mode", "") for it in items]))
    return out


def to_input(u8: torch.Tensor, spec: PreprocessSpec, size: int | None = None) -> torch.Tensor:
    """uint8 (n, s, s), or float in [0, 1], -> normalised float (n, C, size, size), channels_last."""
    x = (u8.float().div_(255.0) if u8.dtype == torch.uint8 else u8.float())[:, None]
    if size and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    x = (x - spec.mean) / spec.std
    return x.expand(-1, spec.channels, -1, -1).contiguous(memory_format=torch.channels_last)


class Augment:
    """Batch augmentation on cached uint8 slices (all in torch, cheap next to the network).

    Geometry: rotation +-``rot`` degrees, isotropic scale, translation, optional left-right
    (``flip``) and up-down (``vflip``) flips, in one ``grid_sample`` that also resamples to the
    training size. Intensity (the
    display-window spread between scanners/exports, in [0, 1] display space): contrast
    (window width) and brightness (level) jitter, gamma, Gaussian noise, occasional blur.
    """

    def __init__(self, rot=10.0, scale=(0.9, 1.1), shift=0.05, flip=False, contrast=(0.8, 1.25),
                 brightness=0.08, gamma=(0.85, 1.15), noise=0.03, blur_p=0.2, seed=0, vflip=False):
        self.rot, self.scale, self.shift, self.flip, self.vflip = rot, scale, shift, flip, vflip
        self.contrast, self.brightness, self.gamma = contrast, brightness, gamma
        self.noise, self.blur_p = noise, blur_p
        self.seed = seed
        self.g = torch.Generator().manual_seed(seed)
        self._g_dev: torch.Generator | None = None    # the noise's, for input on a GPU

    def _u(self, n, lo, hi):
        return torch.rand(n, generator=self.g) * (hi - lo) + lo

    def __call__(self, u8: torch.Tensor, spec: PreprocessSpec, size: int, masks=None):
        """uint8 (or float in [0, 1]) (n, s, s) -> model input; with ``masks`` (n, s, s) also
        the masks under the same geometric transform, (n, 1, size, size) float. Runs on the
        input's device (the random parameters are drawn on the CPU)."""
        n, dev = u8.shape[0], u8.device
        x = (u8.float().div_(255.0) if u8.dtype == torch.uint8 else u8.float())[:, None]
        ang = self._u(n, -self.rot, self.rot) * math.pi / 180
        sc = self._u(n, *self.scale)
        fl = torch.where(torch.rand(n, generator=self.g) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n)
        vf = torch.where(torch.rand(n, generator=self.g) < 0.5, -1.0, 1.0) if self.vflip else torch.ones(n)
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * fl, -sin * vf
        theta[:, 1, 0], theta[:, 1, 1] = sin * fl, cos * vf
        theta[:, :, 2] = self._u(2 * n, -self.shift, self.shift).view(n, 2) * 2
        theta = theta.to(dev)
        if size < x.shape[-1]:   # antialias before the geometric resample
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks.float()[:, None], grid, mode="bilinear",
                                  padding_mode="zeros", align_corners=False)
        # intensity: window width/level jitter, gamma
        c = self._u(n, *self.contrast).view(n, 1, 1, 1).to(dev)
        b = self._u(n, -self.brightness, self.brightness).view(n, 1, 1, 1).to(dev)
        x = ((x - 0.5) * c + 0.5 + b).clamp_(0, 1)
        x = x.pow(self._u(n, *self.gamma).view(n, 1, 1, 1).to(dev))
        blur = torch.rand(n, generator=self.g) < self.blur_p
        if blur.any():
            k = torch.tensor([1., 2., 1.], device=dev) / 4
            k2 = (k[:, None] * k[None]).view(1, 1, 3, 3)
            twice = blur & (torch.rand(n, generator=self.g) < 0.5)   # a wider blur for some
            blur, twice = blur.to(dev), twice.to(dev)
            x[blur] = F.conv2d(x[blur], k2, padding=1)
            if twice.any():
                x[twice] = F.conv2d(x[twice], k2, padding=1)
        sig = self._u(n, 0, self.noise).view(n, 1, 1, 1).to(dev)
        x = (x + sig * self._randn(x.shape, dev)).clamp_(0, 1)
        x = (x - spec.mean) / spec.std
        x = x.expand(-1, spec.channels, -1, -1).contiguous(memory_format=torch.channels_last)
        return x if masks is None else (x, masks)

    def _randn(self, shape, dev) -> torch.Tensor:
        if dev.type == "cpu":
            return torch.randn(shape, generator=self.g)
        if self._g_dev is None:
            self._g_dev = torch.Generator(device=dev).manual_seed(self.seed)
        return torch.randn(shape, generator=self._g_dev, device=dev)
