"""``prepare``: Volume -> SliceBatch (slabs, in-plane resample, slice selection, 224x224 tensors).

Steps, all keeping exact LPS geometry in ``SliceBatch.grid``:

1. along z, thin slices are averaged into slabs of ``spec.slab_mm`` (SimpleITK ``BinShrink``:
   k = round(slab_mm / slice step) source slices per slab, a mean, never nearest);
2. in-plane, linear resampling to ``spec.spacing`` mm (SimpleITK ``Resample``);
3. slice selection per the organ config (each skip with its reason);
   (PNG/JPG slices have no physical spacing: steps 1-2 are skipped for them);
   with ``spec.body_mask`` the grid is then cropped (SimpleITK, geometry kept) to the union
   of the included slices' body boxes;
4. every included grid slice -> :func:`dicompipe.preprocess.render.render` (window, square pad,
   resize, normalise) — the same function training uses.

Example::

    >>> batch = prepare(volume, bundle.spec, organ="lung", selection=cfg["slice_selection"])
    >>> batch.tensors.shape           # (n_included, 3, 224, 224) float32
    >>> batch.slices[0].volume_z      # volume z indices averaged into model slice 0
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk

from dicompipe.errors import PreprocessError
from dicompipe.preprocess.body import body_box, body_mask, foreground_box
from dicompipe.preprocess.render import model_foreground, model_gray, render, square_pad
from dicompipe.preprocess.selection import skip_reasons
from dicompipe.types import InstanceRef, ModelSlice, PreprocessSpec, SliceBatch, Volume

AIR_HU = -1024.0


def prepare(volume: Volume, spec: PreprocessSpec, *, organ: str | None = None,
            select_slices: bool = True, selection: dict | None = None,
            render_ahead: bool = False) -> SliceBatch:
    """Model-ready tensors for one volume, with the map from each model slice to its sources.

    ``organ`` picks the slice-selection rules ("lung" | "pancreas"; None: keep all);
    ``selection`` overrides their thresholds (the organ config's ``slice_selection``).
    ``render_ahead``: return as soon as the slices are chosen and render the tensors in a
    background thread, so inference can start on the first rows (``predict`` waits for the
    rows it needs; anyone else reading ``tensors`` calls ``batch.wait_rows()`` first).
    Raises :class:`PreprocessError` when no slice is left to analyse.

    >>> b = prepare(vol, PreprocessSpec(slab_mm=5.0), organ="lung")
    >>> [s.skip_reason for s in b.slices if not s.included]
    """
    if volume.image.GetDimension() != 3:
        raise PreprocessError(f"Series {volume.series.key}: expected a 3D volume, got "
                              f"{volume.image.GetDimension()}D.")
    warnings: list[str] = []
    img = volume.image
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    fill = 0.0 if volume.windowed else AIR_HU

    # image files (PNG/JPG) carry no physical spacing: use their slices as they are
    physical = volume.series.kind != "images"
    if not physical and (spec.slab_mm or spec.spacing):
        warnings.append("PNG/JPG slices have no physical spacing: used as they are, without "
                        "slab averaging or resampling to the bundle's spacing.")

    # 1. slabs along z (mean of k consecutive slices, geometry from BinShrink)
    nz = img.GetSize()[2]
    dz = img.GetSpacing()[2]
    k = 1
    if physical and spec.slab_mm and spec.slab_mm > dz * 1.25 and nz > 1:
        k = max(1, min(nz, int(round(spec.slab_mm / dz))))
    n_slabs = nz // k
    start = (nz - n_slabs * k) // 2
    if k > 1:
        if n_slabs * k != nz:
            left = list(range(start)) + list(range(start + n_slabs * k, nz))
            warnings.append(f"{len(left)} edge slice(s) (volume z {left}) do not fill a whole "
                            f"{k * dz:g} mm slab and are not analysed.")
            img = img[:, :, start:start + n_slabs * k]
        img = sitk.BinShrink(img, [1, 1, k])
    volume_z = [list(range(start + j * k, start + (j + 1) * k)) for j in range(n_slabs)]

    # 2. in-plane spacing
    sx, sy = img.GetSpacing()[:2]
    if physical and spec.spacing and (abs(sx - spec.spacing) > 0.01 * spec.spacing
                         or abs(sy - spec.spacing) > 0.01 * spec.spacing):
        img = _resample_inplane(img, float(spec.spacing), fill)
    grid = img
    arr = sitk.GetArrayViewFromImage(grid)              # (z, y, x), a view: never written

    # 3. slice selection
    if select_slices:
        reasons = skip_reasons(arr, organ, selection, windowed=volume.windowed)
        if volume.windowed and organ:
            warnings.append("Input is already-windowed 8-bit images (no HU): slice selection "
                            "only skipped blank slices.")
    else:
        reasons = [None] * arr.shape[0]

    slices: list[ModelSlice] = []
    rows: list[int] = []
    for z in range(arr.shape[0]):
        srcs = _sources(volume, volume_z[z])
        why = reasons[z]
        ms = ModelSlice(z=z, volume_z=volume_z[z], sources=srcs, included=why is None,
                        skip_reason=why, row=len(rows) if why is None else None)
        if why is None:
            rows.append(z)
        slices.append(ms)
    if not rows:
        counts: dict[str, int] = {}
        for r in reasons:
            key = (r or "").split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        why = ", ".join(f"{n} x {r}" for r, n in counts.items())
        raise PreprocessError(
            f"Series {volume.series.series_description or volume.series.key} "
            f"({volume.series.source}): no slice in range for {organ} ({len(reasons)} slices "
            f"skipped: {why}). Check that this CT covers the {organ}, choose the other organ, "
            "or analyse all slices with --all-slices (select_slices=False).")

    if spec.body_mask:
        grid = _crop_to_body(grid, arr, rows, spec, volume.windowed)
        arr = sitk.GetArrayViewFromImage(grid)

    # 4. tensors, the same render() as training
    n_ch = spec.channels
    tensors = np.empty((len(rows), n_ch, spec.size, spec.size), np.float32)
    last = arr.shape[0] - 1

    def render_rows(done=None):
        for i, z in enumerate(rows):
            if spec.channel_mode == "neighbours":
                half = n_ch // 2
                idx = [min(max(z + d, 0), last) for d in range(-half, n_ch - half)]
                stack = arr[idx]
            else:
                stack = arr[z]
            tensors[i] = render(stack, spec, windowed=volume.windowed, crop=False)
            if done:
                done(i + 1)
    pending = _render_in_background(render_rows, grid) if render_ahead else render_rows()
    _, pad = square_pad(np.empty(arr.shape[1:], np.uint8))
    return SliceBatch(tensors=tensors, slices=slices, spec=spec, grid=grid, pad=pad,
                      volume=volume, warnings=warnings, pending=pending)


def _render_in_background(render_rows, grid):
    """Run ``render_rows(done)`` in a thread; return ``wait(n)``, which blocks until ``n``
    rows are done. Rendering (numpy, torch's resize) releases the GIL, so the model can
    start on the first rows while the rest are rendered. The thread holds ``grid``: the
    rows are read through a numpy view of its buffer."""
    cond = threading.Condition()
    state = {"done": 0, "error": None, "finished": False}

    def done(n):
        with cond:
            state["done"] = n
            cond.notify_all()

    def work(_hold=grid):
        try:
            render_rows(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            state["error"] = e
        finally:
            with cond:
                state["finished"] = True
                cond.notify_all()

    def wait(n: int) -> None:
        with cond:
            cond.wait_for(lambda: state["done"] >= n or state["finished"])
        if state["done"] < n and state["error"] is not None:
            raise state["error"]

    threading.Thread(target=work, name="dicompipe-render", daemon=True).start()
    return wait


def _crop_to_body(grid, arr, rows: list[int], spec: PreprocessSpec, windowed: bool):
    """The grid cropped (exact geometry) to the union of the body boxes of slices ``rows``.
    The masks are computed on two threads: this runs before the model can start, while the
    second core would idle (about a tenth faster on 2 cores; most of a mask's work is small
    numpy calls that hold the GIL)."""
    def box_of(z):
        if not spec.mask_adaptive:
            return foreground_box(model_foreground(arr[z], spec, windowed), spec.crop_margin)
        m = body_mask(model_gray(arr[z], spec, windowed) * 255.0, spec.mask_threshold, True)
        return body_box(m, spec.crop_margin)
    with ThreadPoolExecutor(2 if len(rows) > 8 else 1) as ex:
        boxes = np.array([b for b in ex.map(box_of, rows) if b is not None])
    if not len(boxes):
        return grid
    y0, x0 = boxes[:, [0, 2]].min(0)
    y1, x1 = boxes[:, [1, 3]].max(0)
    return grid[int(x0):int(x1), int(y0):int(y1), :]


def _resample_inplane(img, spacing: float, fill: float):
    """Linear resample to ``spacing`` mm in x and y, same z, same origin and direction."""
    size = img.GetSize()
    sp = img.GetSpacing()
    new_sp = (spacing, spacing, sp[2])
    new_size = [max(1, int(round(size[i] * sp[i] / new_sp[i]))) for i in range(2)] + [size[2]]
    return sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         new_sp, img.GetDirection(), fill, sitk.sitkFloat32)


def _sources(volume: Volume, zs: list[int]) -> list[InstanceRef]:
    seen, out = set(), []
    for z in zs:
        for ref in (volume.slices[z] if z < len(volume.slices) else []):
            key = (ref.file, ref.frame, ref.sop_instance_uid)
            if key not in seen:
                seen.add(key)
                out.append(ref)
    return out
