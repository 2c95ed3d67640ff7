"""PNG/JPG slice folders (already-windowed 8-bit images, the original app's input).

Slices are ordered by natural sort of their file names (``slice2`` before ``slice10``),
colour images become grey (ITU-R 601 luma, Pillow's "L" conversion), and the volume is
flagged ``windowed=True`` (values 0..255, not HU) so later stages do not window it again.
Spacing is unknown in such files: pass ``spacing=(x, y, z)`` mm, else 1 mm is assumed.

Example::

    >>> from dicompipe import io
    >>> vol = io.load(io.select(io.discover("slices/")), spacing=(0.7, 0.7, 1.0))
    >>> vol.windowed
    True
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicompipe.errors import UnreadableSeries, UnsupportedInput
from dicompipe.io.limits import BYTES_PER_VOXEL, check_budget
from dicompipe.types import InstanceRef, SeriesInfo, Volume

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def natural_key(name: str) -> list:
    """Sort key that orders digit runs numerically: ``slice2`` < ``slice10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _size(path: Path) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.size                      # (width, height), header only
    # SyntaxError: Pillow's word for a corrupt PNG chunk (found by the fuzzer)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError):
        return None                             # not an image, damaged, or over PIL's pixel limit


def discover_images(files: list[Path], source: str) -> tuple[list[SeriesInfo], list[str]]:
    """One candidate per folder and image size. Returns (series, unreadable files)."""
    groups: dict[tuple, list[Path]] = defaultdict(list)
    bad = []
    for f in files:
        s = _size(f)
        if s is None:
            bad.append(str(f))
        else:
            groups[(str(f.parent), s)].append(f)
    out = []
    for (folder, (w, h)), fs in sorted(groups.items()):
        fs.sort(key=lambda p: natural_key(p.name))
        info = SeriesInfo(
            key="", kind="images", source=str(source),
            instances=[InstanceRef(file=str(p), instance_number=i + 1) for i, p in enumerate(fs)],
            series_description=f"{len(fs)} image slice(s) in {Path(folder).name or folder}",
            rows=h, columns=w, orientation=None,
            transfer_syntax=",".join(sorted({p.suffix.lower().lstrip('.') for p in fs})))
        info.warnings.append("PNG/JPG slices: already-windowed 8-bit display values, not HU; "
                             "no spacing or position in the files")
        if len(groups) > 1:
            info.warnings.append(f"images under {source} differ in folder or size: "
                                 f"this candidate holds the {w}x{h} images of {folder}")
        out.append(info)
    return out, bad


def load_images(series: SeriesInfo, *, spacing=None, max_memory=None) -> Volume:
    """Stack the slice images of ``series`` into a windowed (0..255) float32 volume.

    ``spacing``: (x, y, z) mm, or one number for all three; default 1 mm (with a warning).
    Geometry: origin (0, 0, 0), identity direction — image rows run anterior→posterior
    like an axial CT slice shown in the usual way.
    """
    from PIL import Image, UnidentifiedImageError
    warnings = []
    if spacing is None:
        sp: tuple[float, ...] = (1.0, 1.0, 1.0)
        warnings.append("image slices carry no spacing: assuming 1 mm (give it with --spacing X,Y,Z, "
                        "or spacing=(x, y, z) in Python)")
    else:
        sp = tuple(float(v) for v in (np.broadcast_to(np.asarray(spacing, float), (3,))))
        if min(sp) <= 0:
            raise UnsupportedInput(f"spacing must be positive, got {spacing}")
    planes, slices = [], []
    shape = (series.rows, series.columns)
    check_budget(series.n_instances * (series.rows or 0) * (series.columns or 0) * BYTES_PER_VOXEL,
                 f"{series.n_instances} image(s) of {series.columns} x {series.rows}", max_memory)
    for ref in series.instances:
        try:
            with Image.open(ref.file) as im:
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    raise UnsupportedInput(
                        f"{ref.file} is a {im.mode} image (16-bit or float), not 8-bit windowed slices. "
                        "Convert it to 8-bit PNG/JPG, or give the original DICOM/NIfTI.")
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA").convert("RGB")
                grey = np.asarray(im.convert("L"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError,
                SyntaxError) as e:
            warnings.append(f"skipped unreadable image {ref.file}: {e}")
            continue
        if grey.shape != shape:
            warnings.append(f"skipped {ref.file}: size {grey.shape[1]}x{grey.shape[0]} differs from "
                            f"{shape[1]}x{shape[0]}")
            continue
        planes.append(grey)
        slices.append([ref])
    if not planes:
        raise UnreadableSeries(f"No image of {series.key} could be read (first: "
                               f"{series.instances[0].file if series.instances else '-'}).")
    img = sitk.GetImageFromArray(np.stack(planes).astype(np.float32))
    img.SetSpacing(sp)
    if len(planes) == 1:
        warnings.append("single image: a one-slice input")
    return Volume(image=img, slices=slices, series=series, windowed=True, warnings=warnings)
