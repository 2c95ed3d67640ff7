"""preprocess.prepare: slab averaging and in-plane resampling with exact LPS geometry,
slice selection with reasons, tensors identical to render(), windowed input, neighbours."""
import numpy as np
import pytest
import SimpleITK as sitk
from tiny_bundle import chest_phantom, make_volume

from dicompipe.errors import PreprocessError
from dicompipe.preprocess import prepare
from dicompipe.preprocess.render import render, square_pad
from dicompipe.types import PreprocessSpec

# an oblique-ish direction (columns = LPS directions of x, y, z), to catch axis mix-ups
DIRECTION = (1, 0, 0, 0, 0, -1, 0, 1, 0)          # a coronal acquisition


def _ramp(shape):
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    return 10.0 * z + 0.5 * y + 2.0 * x - 500.0


def test_slabs_average_thin_slices_with_exact_geometry():
    hu = _ramp((12, 10, 14))
    vol = make_volume(hu, spacing=(0.7, 0.8, 1.0), origin=(5.0, -3.0, 20.0), direction=DIRECTION)
    before = hu.copy()
    b = prepare(vol, PreprocessSpec(slab_mm=4.0), select_slices=False)
    g = b.grid
    assert g.GetSize() == (14, 10, 3) and g.GetSpacing() == pytest.approx((0.7, 0.8, 4.0))
    assert g.GetDirection() == pytest.approx(DIRECTION)
    arr = sitk.GetArrayFromImage(g)
    for j, s in enumerate(b.slices):
        assert s.volume_z == [4 * j, 4 * j + 1, 4 * j + 2, 4 * j + 3]
        np.testing.assert_allclose(arr[j], hu[4 * j:4 * j + 4].mean(0), rtol=0, atol=1e-3)
        # the slab centre is the mean position of its source slices, in LPS
        centre = np.mean([vol.image.TransformIndexToPhysicalPoint((0, 0, z)) for z in s.volume_z], 0)
        np.testing.assert_allclose(g.TransformIndexToPhysicalPoint((0, 0, j)), centre, atol=1e-6)
        assert [r.instance_number for r in s.sources] == [z + 1 for z in s.volume_z]
    np.testing.assert_array_equal(vol.array, before)          # input untouched


def test_leftover_edge_slices_are_reported():
    vol = make_volume(_ramp((11, 8, 8)), spacing=(1.0, 1.0, 1.0))
    b = prepare(vol, PreprocessSpec(slab_mm=5.0), select_slices=False)
    assert [s.volume_z for s in b.slices] == [list(range(0, 5)), list(range(5, 10))]
    assert any("1 edge slice(s)" in w for w in b.warnings)


def test_thick_slices_are_kept_one_to_one():
    vol = make_volume(_ramp((4, 8, 8)), spacing=(1.0, 1.0, 5.0))
    b = prepare(vol, PreprocessSpec(slab_mm=5.0), select_slices=False)
    assert [s.volume_z for s in b.slices] == [[0], [1], [2], [3]]
    assert b.grid.GetSpacing()[2] == 5.0


def test_inplane_resample_matches_physical_positions():
    ny, nx = 30, 40
    y, x = np.mgrid[:ny, :nx].astype(np.float32)
    hu = np.stack([3.0 * x * 0.5 + 1.0 * y * 0.6] * 3) - 200.0          # linear in mm
    vol = make_volume(hu, spacing=(0.5, 0.6, 2.0), origin=(10.0, 20.0, 30.0))
    b = prepare(vol, PreprocessSpec(spacing=1.2), select_slices=False)
    g = b.grid
    assert g.GetSpacing() == pytest.approx((1.2, 1.2, 2.0))
    assert g.GetSize() == (round(nx * 0.5 / 1.2), round(ny * 0.6 / 1.2), 3)
    assert g.GetOrigin() == pytest.approx((10.0, 20.0, 30.0))
    arr = sitk.GetArrayFromImage(g)
    for (j, i) in [(0, 0), (5, 7), (10, 12)]:
        px, py, _ = g.TransformIndexToPhysicalPoint((i, j, 1))
        assert arr[1, j, i] == pytest.approx(3.0 * (px - 10.0) + (py - 20.0) - 200.0, abs=1e-3)


def test_tensors_are_render_of_grid_slices_and_pad_is_square_pad():
    hu = chest_phantom((10, 40, 64))
    vol = make_volume(hu)
    spec = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0)], channels=3, size=32)
    b = prepare(vol, spec, select_slices=False)
    assert b.tensors.shape == (10, 3, 32, 32) and b.tensors.dtype == np.float32
    grid = sitk.GetArrayFromImage(b.grid)
    for s in b.slices:
        np.testing.assert_array_equal(b.tensors[s.row], render(grid[s.z], spec))
    assert b.pad == square_pad(grid[0])[1] == (12, 0, 64)


@pytest.mark.parametrize("body", [False, True])
def test_one_image_in_every_channel_is_rendered_once_with_the_same_numbers(body):
    """One window (or a transfer, or 8-bit input) puts one image in all channels: render()
    then works on one channel; the result equals the per-channel path (two equal windows)."""
    from dataclasses import replace
    hu = chest_phantom((1, 40, 64))[0]
    spec = PreprocessSpec(windows=[(40.0, 400.0)], channels=3, size=24, body_mask=body)
    one, each = render(hu, spec), render(hu, replace(spec, windows=[(40.0, 400.0)] * 2))
    assert one.shape == (3, 24, 24)
    np.testing.assert_array_equal(one, each)


def test_neighbours_mode_uses_adjacent_slices():
    hu = _ramp((5, 8, 8))
    spec = PreprocessSpec(windows=[(-480.0, 200.0)], channel_mode="neighbours", size=8,
                          mean=0.0, std=1.0)
    b = prepare(make_volume(hu), spec, select_slices=False)
    # channel c of slice z is slice z-1+c (clamped) under the first window
    win = lambda a: np.clip((a - (-580.0)) / 200.0, 0, 1)      # noqa: E731
    np.testing.assert_allclose(b.tensors[2, 0], win(hu[1]), atol=1e-6)
    np.testing.assert_allclose(b.tensors[2, 2], win(hu[3]), atol=1e-6)
    np.testing.assert_allclose(b.tensors[0, 0], win(hu[0]), atol=1e-6)   # clamped at the edge
    np.testing.assert_allclose(b.tensors[4, 2], win(hu[4]), atol=1e-6)


def test_windowed_input_is_not_windowed_again():
    img = np.full((3, 16, 16), 128.0, np.float32)
    img[:, 4:8, 4:8] = 200.0
    img[1] = 0.0                                       # a blank slice
    vol = make_volume(img, windowed=True)
    spec = PreprocessSpec(windows=[(-600.0, 1500.0)], size=16)
    b = prepare(vol, spec, organ="lung")
    assert [s.included for s in b.slices] == [True, False, True]
    assert b.slices[1].skip_reason.startswith("blank slice")
    assert any("already-windowed" in w for w in b.warnings)
    expected = (img[0] / 255.0 - spec.mean) / spec.std          # scaled to [0, 1], no HU window
    for c in range(3):
        np.testing.assert_allclose(b.tensors[0, c], expected, atol=1e-6)


def test_lung_selection_skips_slices_without_lung_with_reasons():
    hu = chest_phantom((20, 48, 48), lung_z=(0.3, 0.7))
    hu[0] = -1000.0                                    # above the patient: air only
    b = prepare(make_volume(hu), PreprocessSpec(size=32), organ="lung")
    reasons = [s.skip_reason for s in b.slices]
    assert reasons[0].startswith("too little body")
    assert reasons[1].startswith("no lung")
    inc = [s.z for s in b.slices if s.included]
    assert inc == list(range(6, 14)) and len(b.tensors) == len(inc)
    assert [s.row for s in b.included] == list(range(len(inc)))
    assert all(s.row is None for s in b.slices if not s.included)
    everything = prepare(make_volume(hu), PreprocessSpec(size=32), organ="lung",
                         select_slices=False)
    assert all(s.included for s in everything.slices) and len(everything.tensors) == 20


def test_pancreas_selection_skips_lung_slices():
    hu = chest_phantom((20, 48, 48), lung_z=(0.0, 0.45))
    b = prepare(make_volume(hu), PreprocessSpec(size=32), organ="pancreas")
    skipped = [s for s in b.slices if not s.included]
    assert skipped and all(s.skip_reason.startswith("above the abdomen") for s in skipped)
    assert b.slices[-1].included


def test_selection_thresholds_come_from_config():
    hu = chest_phantom((10, 48, 48), lung_z=(0.0, 1.0))
    # lungs are about 43% of the body area in this phantom
    b = prepare(make_volume(hu), PreprocessSpec(size=32), organ="lung",
                selection={"min_lung_fraction": 0.3})
    assert all(s.included for s in b.slices)
    with pytest.raises(PreprocessError, match="no slice in range for lung.*--all-slices"):
        prepare(make_volume(hu), PreprocessSpec(size=32), organ="lung",
                selection={"min_lung_fraction": 0.5})


def test_no_slice_in_range_is_a_clear_error():
    body_only = chest_phantom((6, 40, 40), lung_z=(2.0, 3.0))   # no lung anywhere
    with pytest.raises(PreprocessError, match=r"6 x no lung"):
        prepare(make_volume(body_only), PreprocessSpec(size=32), organ="lung")


def test_render_ahead_gives_the_same_tensors_and_reraises_errors(monkeypatch):
    vol = make_volume(chest_phantom((12, 40, 64)))
    spec = PreprocessSpec(windows=[(-600.0, 1500.0)], channels=3, size=32)
    now = prepare(vol, spec, select_slices=False)
    ahead = prepare(vol, spec, select_slices=False, render_ahead=True)
    ahead.wait_rows(3)
    np.testing.assert_array_equal(ahead.tensors[:3], now.tensors[:3])
    ahead.wait_rows()
    np.testing.assert_array_equal(ahead.tensors, now.tensors)
    assert now.pending is None

    import importlib
    P = importlib.import_module("dicompipe.preprocess.prepare")   # the module, not the function
    calls = []

    def broken(stack, spec, windowed=False, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("render failed on slice 5")
        return render(stack, spec, windowed=windowed)
    monkeypatch.setattr(P, "render", broken)
    bad = prepare(vol, spec, select_slices=False, render_ahead=True)
    bad.wait_rows(4)                                    # rows before the failure are fine
    with pytest.raises(ValueError, match="slice 5"):
        bad.wait_rows()
