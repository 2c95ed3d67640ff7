"""The pancreas lesion check's ceiling (``benchmarks.real_ct.cell_cover``): a perfect map at
the CAM's resolution peaks in a lesion larger than a cell, and misses a small one placed
between cell centres: the bound is the map's resolution, not the model."""
import numpy as np
from synth import write_ct_series

from dicompipe import io
from dicompipe.preprocess import prepare
from dicompipe.preprocess.inverse import to_slice
from dicompipe.types import PreprocessSpec


def ideal_peak_in(batch, z, alpha, shape=(4, 4)):
    from benchmarks.real_ct import cell_cover
    row = next(s.row for s in batch.slices if z in s.volume_z)
    maps = np.zeros((len(batch.tensors), *shape), np.float32)
    maps[row] = cell_cover(batch, row, z, alpha, shape)
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    py, px = np.unravel_index(int(np.argmax(to_slice(batch, maps, z))), alpha.shape)
    return bool(alpha[py, px] > 0.5)


def test_a_perfect_coarse_map_finds_big_lesions_and_misses_small_ones(tmp_path):
    write_ct_series(tmp_path, shape=(3, 64, 64), spacing=(1.0, 1.0, 2.0))
    vol = io.load(io.select(io.discover(tmp_path)))
    batch = prepare(vol, PreprocessSpec(windows=[(40.0, 400.0)], size=32, slab_mm=2.0),
                    select_slices=False)
    yy, xx = np.mgrid[:64, :64]
    # 4 x 4 cells of 16 px: centres at 8, 24, 40, 56
    assert ideal_peak_in(batch, 1, (np.hypot(yy - 30, xx - 30) < 14).astype(float))
    assert not ideal_peak_in(batch, 1, (np.hypot(yy - 32, xx - 32) < 3).astype(float))
