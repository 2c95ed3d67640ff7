"""Input hygiene: 8-bit representation, body mask (table, FOV circle), crop, equalisation."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from synth import chest_hu

from dicompipe.preprocess.body import body_box, body_mask, close_open, filled_hull, to_u8
from dicompipe.preprocess.render import equalize, render
from dicompipe.train.run import LUNG_TRANSFER, spec_v2


def test_to_u8_floor_and_window():
    t = to_u8(np.array([-1000.0, -1.0, 0.0, 75.0, 150.0, 900.0]), LUNG_TRANSFER)
    assert t[0] == 0 and t[1] == 0                     # below the floor: black, like IQ-OTH
    assert t[2] == pytest.approx(130.0) and t[4] == pytest.approx(255.0) and t[5] == 255.0
    assert 130 < t[3] < 255
    w = to_u8(np.array([-200.0, 50.0, 300.0]), {"kind": "window", "window": [50.0, 500.0]})
    np.testing.assert_allclose(w, [0.0, 127.5, 255.0])
    with pytest.raises(ValueError, match="unknown transfer"):
        to_u8(np.zeros(2), {"kind": "sigmoid"})


@pytest.mark.parametrize("transfer", [LUNG_TRANSFER, {"kind": "window", "window": [50.0, 500.0]}])
def test_body_mask_drops_table_and_fov_and_keeps_the_lungs(transfer):
    hu, body, tab = chest_hu()
    m = body_mask(to_u8(hu, transfer))
    wall = ((np.mgrid[:256, :256][1] / 256 - 0.5) / 0.35) ** 2 + \
        ((np.mgrid[:256, :256][0] / 256 - 0.45) / 0.25) ** 2 < 1
    assert m[wall].mean() > 0.97                        # the chest wall and the lungs inside it
    assert m[tab].mean() < 0.02                         # the scanner table is gone
    assert m[~body].mean() < 0.03                       # and the air / FOV border


def test_body_mask_keeps_a_front_cut_off_by_black_fat():
    """Under the lung transfer fat is black: at the diaphragm dome the heart and the front
    chest wall can be one piece, apart from the back and sides, with its centre beyond
    their hull (a Lung-PET-CT-Dx slice lost its front this way). It belongs to the body."""
    n = 256
    yy, xx = np.mgrid[:n, :n].astype(float)
    r = np.hypot((yy - 128) / 100, (xx - 128) / 110)
    img = np.zeros((n, n), np.float32)
    img[(r > 0.75) & (r < 1.0) & (yy > 100)] = 200.0                 # back and sides
    img[(yy > 170) & (np.abs(xx - 128) < 20)] = 255.0                # spine
    front = (r > 0.88) & (r < 1.0) & (yy < 90)                       # front chest wall
    front |= (yy < 90) & (yy > 30) & (np.abs(xx - 140) < 8)
    front |= np.hypot(yy - 112, xx - 140) < 26                        # heart, partly in the U
    img[front] = 180.0
    m = body_mask(img)
    assert m[front].mean() > 0.97 and m[img > 0].mean() > 0.97


def test_filled_hull_matches_skimage_within_a_rim():
    from skimage.morphology import convex_hull_image
    m = to_u8(chest_hu()[0], LUNG_TRANSFER) > 40
    ours, ref = filled_hull(m), convex_hull_image(m)
    assert (m <= ours).all() and not (ours & ~ref).any()
    assert (ref & ~ours).sum() < 0.005 * ref.sum()            # a few rim pixels at most
    assert filled_hull(np.eye(6, dtype=bool)).sum() == 6      # a line stays a line
    assert not filled_hull(np.zeros((4, 4), bool)).any()


def test_close_open_equals_scipy():
    from scipy import ndimage
    from skimage.morphology import disk
    rng = np.random.default_rng(0)
    for k in range(8):                        # speckle, blobs and thin lines up to the border
        m = ndimage.binary_dilation(rng.uniform(size=(96, 80)) < 0.03, iterations=k % 4)
        ref = ndimage.binary_opening(ndimage.binary_closing(m, disk(2)), disk(2))
        np.testing.assert_array_equal(close_open(m), ref)
    for shape in [(1, 1), (1, 7), (2, 3), (4, 1), (5, 5), (6, 9)]:     # smaller than the disk
        m = rng.uniform(size=shape) < 0.7
        ref = ndimage.binary_opening(ndimage.binary_closing(m, disk(2)), disk(2))
        np.testing.assert_array_equal(close_open(m), ref)


def test_blocks_of_the_thresholded_image_equal_the_thresholded_block_maximum():
    from dicompipe.preprocess.body import _blocks
    a = np.random.default_rng(1).uniform(0, 80, size=(517, 301)).astype(np.float32)
    for step in (1, 2, 3):
        np.testing.assert_array_equal(_blocks(a > 40, step, np.logical_or),
                                      _blocks(a, step, np.maximum) > 40)


def test_adaptive_mask_ignores_grey_air_inside_the_field_of_view():
    n = 200
    yy, xx = np.mgrid[:n, :n] / n
    img = np.zeros((n, n), np.float32)
    img[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.48 ** 2] = 70.0            # wide-window air
    body = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1
    img[body] = 150.0
    assert body_mask(img, 15.0).mean() > body.mean() * 1.5             # fixed level: FOV taken
    m = body_mask(img, 15.0, adaptive=True)
    assert abs(int(m.sum()) - int(body.sum())) < 0.03 * body.sum()


def test_body_box_margin_and_empty():
    m = np.zeros((50, 60), bool)
    m[10:20, 5:45] = True
    assert body_box(m, 0.0) == (10, 20, 5, 45)
    assert body_box(m, 0.1) == (6, 24, 1, 49)
    assert body_box(np.zeros((4, 4), bool)) is None


@pytest.mark.parametrize("transfer", [LUNG_TRANSFER, {"kind": "window", "window": [50.0, 500.0]}])
@pytest.mark.parametrize("shape", [(256, 256), (512, 512), (511, 389), (700, 250)])
def test_the_crop_box_from_the_thresholded_slice_is_the_body_masks_box(transfer, shape):
    """prepare() asks the box of every slice before the model starts: foreground_box (no
    full-size mask, HU >= floor instead of the transfer) must give exactly body_box's box."""
    from dicompipe.preprocess.body import foreground_box
    from dicompipe.preprocess.render import model_foreground, model_gray
    hu = sitk.GetArrayFromImage(sitk.Resample(
        sitk.GetImageFromArray(chest_hu()[0]), shape[::-1], sitk.Transform(), sitk.sitkLinear,
        (0.0, 0.0), (256 / shape[1], 256 / shape[0]), (1.0, 0.0, 0.0, 1.0), -1000.0))
    spec = replace(spec_v2("lung"), transfer=transfer)
    above = model_foreground(hu, spec, windowed=False)
    np.testing.assert_array_equal(above, model_gray(hu, spec, False) * 255.0 > spec.mask_threshold)
    box = foreground_box(above, 0.04)
    assert box is not None and box == body_box(body_mask(to_u8(hu, transfer)), 0.04)
    assert foreground_box(np.zeros(shape, bool)) is None


def test_equalize_is_invariant_to_monotone_transfers():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.2, 0.8, (64, 64)).astype(np.float32)
    mask = np.zeros_like(img, bool)
    mask[8:56, 8:56] = True
    a = equalize(img, mask)
    b = equalize(np.clip((img - 0.1) ** 1.7 * 1.3, 0, 1), mask)      # another "window"
    assert np.abs(a - b).mean() < 0.01
    assert (a[~mask] == 0).all() and 0 < a[mask].min() and a[mask].max() < 1


def test_render_crops_to_the_body_and_hides_the_table():
    hu, _, tab = chest_hu(table=True)
    spec = spec_v2("lung", size=64)
    x = render(hu, spec)
    hu2 = hu.copy()
    hu2[tab] = -1000.0                                  # same slice without a table
    np.testing.assert_allclose(x, render(hu2, spec), atol=1e-5)
    g = x[0] * spec.std + spec.mean
    cols = np.nonzero(g.max(0) > 0.05)[0]
    assert cols[0] < 8 and cols[-1] > 55               # the body fills the width after the crop


def test_prepare_crops_the_grid_with_exact_geometry():
    from dicompipe.preprocess import prepare
    from dicompipe.preprocess.inverse import to_volume
    from dicompipe.types import SeriesInfo, Volume
    hu, _, _ = chest_hu(128)
    arr = np.repeat(hu[None], 4, 0)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.5, 2.5, 5.0))
    img.SetOrigin((-160.0, -170.0, -300.0))
    vol = Volume(image=img, slices=[[] for _ in range(4)],
                 series=SeriesInfo(key="t", kind="dicom", source="mem"))
    spec = spec_v2("lung", size=64)
    batch = prepare(vol, spec, organ=None, select_slices=False)
    g = batch.grid
    assert g.GetSize()[0] < 128 and g.GetSize()[1] < 128          # cropped to the body
    assert g.GetSpacing() == img.GetSpacing() and g.GetDirection() == img.GetDirection()
    # the grid's first voxel is a voxel of the source image
    idx = img.TransformPhysicalPointToContinuousIndex(g.GetOrigin())
    assert all(abs(v - round(v)) < 1e-6 for v in idx) and idx[2] == 0
    # the tensors equal what training renders from the single slice (its own crop)
    np.testing.assert_allclose(batch.tensors[0], render(hu, spec), atol=0.05)
    # maps go back onto the source grid, zero outside the crop
    ones = np.ones((len(batch.included), 4, 4), np.float32)
    back = sitk.GetArrayFromImage(to_volume(batch, ones))
    assert back.shape == arr.shape
    x0, y0 = int(round(idx[0])), int(round(idx[1]))
    assert back[:, :, :max(0, x0 - 2)].max() == 0
    assert back[1, y0 + 5, x0 + 5] > 0.9


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    from dicompipe.preprocess.selection import fill_holes
    rng = np.random.default_rng(2)
    for k in range(300):                      # rings, speckle, pieces touching the border
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        m = ndimage.binary_dilation(rng.uniform(size=shape) < rng.uniform(0.02, 0.6),
                                    iterations=k % 3)
        np.testing.assert_array_equal(fill_holes(m), ndimage.binary_fill_holes(m))


def test_fill_holes_of_a_stack_fills_each_slice_on_its_own():
    from scipy import ndimage

    from dicompipe.preprocess.selection import fill_holes
    rng = np.random.default_rng(3)
    for k in range(60):
        shape = (int(rng.integers(1, 6)), int(rng.integers(1, 30)), int(rng.integers(1, 30)))
        m = rng.uniform(size=shape) < rng.uniform(0.05, 0.6)
        m = np.stack([ndimage.binary_dilation(s, iterations=k % 3) for s in m])
        want = np.stack([ndimage.binary_fill_holes(s) for s in m])
        np.testing.assert_array_equal(fill_holes(m), want)


def _gray(x, spec):
    return x[0] * spec.std + spec.mean


def test_lung_only_input_keeps_the_lungs_and_a_mass_in_them_and_hides_the_rest():
    hu, _, _ = chest_hu(512)
    yy, xx = np.mgrid[:512, :512] / 512
    with_mass = hu.copy()
    with_mass[((xx - 0.33) / 0.05) ** 2 + ((yy - 0.45) / 0.05) ** 2 < 1] = 40.0
    plain_spec = spec_v2("lung", 160)
    spec = spec_v2("lung", 160, input_region="lung_fields")
    plain, masked = _gray(render(with_mass, plain_spec), spec), _gray(render(with_mass, spec), spec)
    mass = np.abs(plain - _gray(render(hu, plain_spec), spec)) > 0.3
    assert mass.sum() > 20
    np.testing.assert_allclose(masked[mass], plain[mass], atol=0.05)      # the mass is seen
    tissue = plain > 0.3
    assert (masked[tissue] > 0.3).mean() < 0.6            # a rim around the lungs only
    mid = (slice(60, 100), slice(77, 83))
    assert plain[mid].min() > 0.3 and masked[mid].max() < 0.05      # the mediastinum: background (but a resize blur)
    assert masked[:, :8].max() == 0 and masked[:, -8:].max() == 0         # the sides too


def test_lung_only_input_is_the_same_from_hu_from_an_8bit_export_and_from_the_training_cache():
    from dicompipe.preprocess.render import keep_region
    from dicompipe.train.data import to_cache
    hu, _, _ = chest_hu(512)
    spec = spec_v2("lung", 256, input_region="lung_fields")
    from_hu = render(hu, spec)[0] > spec.mean / -spec.std + 1e-3
    from_u8 = render(to_u8(hu, LUNG_TRANSFER), spec, windowed=True)[0] > -spec.mean / spec.std + 1e-3
    cache = to_cache(render(hu, spec_v2("lung", 256)), spec)   # what training renders once
    from_cache = keep_region(cache, spec) > 0
    assert from_hu.mean() > 0.1
    assert (from_hu != from_u8).mean() < 0.005 and (from_hu != from_cache).mean() < 0.005


def test_a_spec_without_input_region_renders_as_before_and_an_unknown_region_is_refused():
    from dataclasses import replace

    from dicompipe.types import PreprocessSpec
    old = PreprocessSpec.from_dict({k: v for k, v in spec_v2("lung", 64).to_dict().items()
                                    if k not in ("input_region", "region_margin")})
    assert old.input_region is None
    hu, _, _ = chest_hu(128)
    np.testing.assert_array_equal(render(hu, old), render(hu, spec_v2("lung", 64)))
    with pytest.raises(ValueError, match="input_region 'liver' is not one of lung_fields"):
        render(hu, replace(old, input_region="liver"))
