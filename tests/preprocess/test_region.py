"""Lung fields for the organ-region ranking of key slices (issue 12): the lungs are kept,
gas under the diaphragm is not, the margin widens them, and the share of a Grad-CAM inside
them is measured on the model input."""
import numpy as np
import pytest
from tiny_bundle import chest_phantom, make_volume

from dicompipe.explain import evidence_inside
from dicompipe.model import aggregate, softmax
from dicompipe.preprocess import prepare
from dicompipe.preprocess.region import lung_fields, model_space
from dicompipe.types import PreprocessSpec, SlicePredictions


def chest_with_stomach_gas(shape=(20, 64, 64)):
    """Lungs in the upper 60 % of z; below them, in z 2-5, a gas bubble (the stomach)."""
    hu = chest_phantom(shape, lung_z=(0.4, 1.0))
    y, x = np.meshgrid(np.linspace(-1, 1, shape[1]), np.linspace(-1, 1, shape[2]), indexing="ij")
    bubble = ((x - 0.3) / 0.15) ** 2 + (y / 0.15) ** 2 < 1     # ~5 % of one lung's volume
    hu[2:6][:, bubble] = -900.0
    return hu, bubble


def test_lung_fields_keep_the_lungs_and_leave_out_gas_under_the_diaphragm():
    hu, bubble = chest_with_stomach_gas()
    mask, step = lung_fields(hu, spacing_mm=1.0, margin_mm=0.0)
    assert step == 3 and mask.shape == (20, 21, 21)
    full = np.pad(np.repeat(np.repeat(mask, step, 1), step, 2), ((0, 0), (0, 1), (0, 1)), mode="edge")
    lungs = (hu > -900) & (hu < -800)                         # -850 HU lungs, not outside air
    upper = slice(9, 20)
    # the lungs' voxels are in the fields (to within the 3 mm pitch), the bubble's are not
    assert (full[upper] & lungs[upper]).sum() / lungs[upper].sum() > 0.9
    assert full[:6][:, bubble].sum() == 0
    assert not full[:6].any()


def test_margin_widens_the_fields_in_plane_only():
    hu, _ = chest_with_stomach_gas()
    tight, _ = lung_fields(hu, 1.0, 0.0)
    wide, _ = lung_fields(hu, 1.0, 9.0)
    assert (wide >= tight).all() and wide.sum() > 1.5 * tight.sum()
    assert not wide[:6].any()                  # no lung in these slices: nothing to widen


def test_no_air_no_fields():
    mask, _ = lung_fields(np.full((4, 30, 30), 40.0), 1.0, 10.0)
    assert mask.shape == (4, 10, 10) and not mask.any()


@pytest.fixture(scope="module")
def batch():
    hu, _ = chest_with_stomach_gas((8, 48, 64))
    return prepare(make_volume(hu, spacing=(1.0, 1.0, 1.0)),
                   PreprocessSpec(windows=[(-600.0, 1500.0)], size=32), organ="lung", select_slices=False)


def test_model_space_follows_the_padding(batch):
    grid_shape = (len(batch.slices),) + tuple(batch.grid.GetSize()[::-1][1:])
    frac = model_space(batch, np.ones(grid_shape, bool))
    assert frac.shape == (len(batch.included), 32, 32)
    y0, x0, side = batch.pad
    assert side > grid_shape[1]                              # rows were padded
    assert frac[:, 16, 16].min() == pytest.approx(1.0)      # the grid's middle is inside
    assert frac[:, 0, 16].max() == 0.0                      # padding is outside


def test_evidence_inside_measures_the_map_mass_in_the_region():
    region = np.zeros((3, 20, 20), np.float32)
    region[:, :, :10] = 1.0                                  # left half
    maps = np.zeros((3, 2, 4, 4), np.float32)
    maps[0, :, :, 0] = 1.0                                   # left column: inside
    maps[0, 1] *= 3.0                                        # class 1: three times the evidence
    maps[1, :, :, 3] = 1.0                                   # right column: outside
    mass, share = evidence_inside(maps, region)             # row 2: empty maps
    assert share[0] == pytest.approx([1.0, 1.0], abs=0.01)
    assert share[1] == pytest.approx([0.0, 0.0], abs=0.01)
    assert (share[2] == 0).all() and (mass[1:] == pytest.approx(0.0, abs=0.01))
    assert mass[0, 1] == pytest.approx(3 * mass[0, 0]) and mass[0, 0] == pytest.approx(0.25, abs=0.03)


def test_region_ranking_puts_evidence_outside_the_organ_last(batch):
    n = len(batch.included)
    p = np.tile([0.1, 0.1, 0.8], (n, 1))
    p[0] = [0.01, 0.01, 0.98]                               # the most malignant slice ...
    logits = np.log(p).astype(np.float32)
    preds = SlicePredictions(labels=["normal", "benign", "malignant"], logits=logits,
                             probabilities=softmax(logits), features=None,
                             head_weight=np.zeros((3, 8), np.float32),
                             head_bias=np.zeros(3, np.float32), batch=batch)
    share = np.ones((n, 3))
    share[0] = 0.05                                          # ... has its evidence outside
    mass = share * np.linspace(1.0, 0.5, n)[:, None]         # in the lung: more on early rows
    plain = aggregate(preds, rule="topk_mean", k=2)
    ranked = aggregate(preds, rule="topk_mean", k=2, region_evidence=mass, region_share=share,
                       region="lung fields")
    assert plain.key_slices[0].row == 0 and plain.region is None
    assert [k.row for k in ranked.key_slices] == [1, 2] and ranked.region == "lung fields"
    assert [k.in_region for k in ranked.key_slices] == [1.0, 1.0]
    # evidence in the lung outranks a higher probability: row 2 has more mass there than row 3
    p[2], p[3] = [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]
    preds.logits = np.log(p).astype(np.float32)
    assert [k.row for k in aggregate(preds, rule="topk_mean", k=2, region_evidence=mass,
                                     region_share=share).key_slices] == [1, 2]
    # the score is the mean calibrated P of the slices the ranking chose
    assert ranked.probabilities["malignant"] == pytest.approx(
        np.mean([k.probability for k in ranked.key_slices]), abs=1e-6)
    assert len(ranked.region_share["malignant"]) == n and "normal" not in ranked.region_share
    assert ranked.region_evidence["malignant"][1] == pytest.approx(mass[1, 2], abs=1e-6)
    with pytest.raises(Exception, match="region_share must be"):
        aggregate(preds, region_evidence=mass, region_share=share[:2])
    with pytest.raises(Exception, match="come together"):
        aggregate(preds, region_share=share)
