"""analyze() end to end on synthetic DICOM and PNG input, its refusals, and the CLI refusal
of untrained bundles."""
import json

import numpy as np
import pytest
from synth import tree_hash, write_ct_series, write_png_slices
from tiny_bundle import chest_phantom, make_bundle

import dicompipe
from dicompipe.cli import main
from dicompipe.errors import DicompipeError, ModelError, PreprocessError, UnreadableSeries, UnsupportedInput
from dicompipe.types import PreprocessSpec

SPEC = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)], size=64,
                      slab_mm=5.0)


@pytest.fixture(scope="module")
def lung_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("b") / "lung", organ="lung", spec=SPEC,
                       favour="malignant")


@pytest.fixture(scope="module")
def chest_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "chest"
    write_ct_series(d, shape=(12, 48, 48), spacing=(0.8, 0.8, 2.5), origin=(-19.0, -19.0, -100.0),
                    hu=chest_phantom((12, 48, 48), lung_z=(0.2, 1.0)), body_part="CHEST",
                    names="noext", shuffle=True)
    return d


def test_analyze_dicom_end_to_end(chest_dir, lung_bundle):
    before = tree_hash(chest_dir)
    stages = []
    a = dicompipe.analyze(chest_dir, organ="auto", model=lung_bundle, backend="torch",
                          device="cpu", allow_untrained=True,
                          progress=lambda s, f, m: stages.append(s))
    assert tree_hash(chest_dir) == before                      # input never modified
    assert a.organ == "lung" and "CHEST" in a.organ_reason
    assert a.verdict.label == "malignant" and not a.verdict.uncertain
    assert sum(a.verdict.probabilities.values()) == pytest.approx(1.0)
    # 12 slices of 2.5 mm -> 6 slabs of 5 mm; the first slab has no lung and is skipped
    assert len(a.batch.slices) == 6
    assert [s.included for s in a.batch.slices] == [False] + [True] * 5
    assert a.batch.slices[0].skip_reason.startswith("no lung")
    assert a.cams is not None and a.cams.maps.shape[0] == 5
    # HU input: key slices ranked by their Grad-CAM mass inside the lung fields
    assert a.verdict.region.startswith("lung fields")
    assert all(0.0 <= k.in_region <= 1.0 for k in a.verdict.key_slices)
    assert len(a.verdict.region_share["malignant"]) == 5
    mass = a.verdict.region_evidence["malignant"]
    assert [k.row for k in a.verdict.key_slices] == sorted(range(5), key=lambda r: -mass[r])
    assert a.model["trained"] is False and a.model["sha256"]
    assert any("UNTRAINED" in w for w in a.warnings)
    assert {"discover", "load", "preprocess", "predict", "aggregate", "explain"} <= set(a.timings)
    assert stages[0] == "discover" and "predict" in stages
    d = json.loads(json.dumps(a.to_dict()))                     # JSON-ready
    assert d["verdict"]["label"] == "malignant"
    key = d["verdict"]["key_slices"][0]
    assert key["files"] and all(f.startswith("<input>/file-") for f in key["files"])  # no PHI
    a.include_phi = True
    files = {p.name for p in chest_dir.iterdir()}
    real = a.to_dict()["verdict"]["key_slices"][0]["files"]
    assert real and all(f.split("/")[-1] in files for f in real)
    assert all(n is not None for n in key["instance_numbers"])
    assert d["slices"][1]["probabilities"]["malignant"] > 0.5
    assert d["slices"][0]["skip_reason"] and "probabilities" not in d["slices"][0]


def test_untrained_bundle_refused_by_default(chest_dir, lung_bundle):
    with pytest.raises(ModelError, match="untrained"):
        dicompipe.analyze(chest_dir, organ="lung", model=lung_bundle, backend="torch")


def test_cli_refuses_untrained_bundle(chest_dir, lung_bundle, tmp_path, capsys):
    rc = main(["analyze", str(chest_dir), "--organ", "lung", "--model", str(lung_bundle),
               "--out", str(tmp_path / "runs"), "--quiet", "--no-history"])
    err = capsys.readouterr().err
    assert rc == 2 and "untrained" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_bundle_for_another_organ(chest_dir, lung_bundle):
    with pytest.raises(ModelError, match="is for lung CT, not pancreas"):
        dicompipe.analyze(chest_dir, organ="pancreas", model=lung_bundle, allow_untrained=True)


def test_non_ct_series_refused(tmp_path, lung_bundle):
    write_ct_series(tmp_path / "mr", shape=(4, 32, 32), modality="MR")
    with pytest.raises(DicompipeError, match="MR, not CT"):
        dicompipe.analyze(tmp_path / "mr", organ="lung", model=lung_bundle, allow_untrained=True)
    with pytest.raises(DicompipeError, match="MR, not CT"):      # even when forced
        dicompipe.analyze(tmp_path / "mr", organ="lung", model=lung_bundle, series="s1",
                          allow_untrained=True)


def test_one_slice_dicom_refused(tmp_path, lung_bundle):
    write_ct_series(tmp_path / "one", shape=(1, 32, 32))
    with pytest.raises(UnreadableSeries, match="single slice"):
        dicompipe.analyze(tmp_path / "one", organ="lung", model=lung_bundle, allow_untrained=True)


def test_no_slice_in_range(tmp_path, lung_bundle):
    write_ct_series(tmp_path / "abd", shape=(6, 40, 40), spacing=(1.0, 1.0, 5.0),
                    hu=chest_phantom((6, 40, 40), lung_z=(2.0, 3.0)), body_part="ABDOMEN")
    with pytest.raises(PreprocessError, match="no slice in range for lung"):
        dicompipe.analyze(tmp_path / "abd", organ="lung", model=lung_bundle, allow_untrained=True)
    a = dicompipe.analyze(tmp_path / "abd", organ="lung", model=lung_bundle, backend="torch",
                          allow_untrained=True, select_slices=False, cam=False)
    assert len(a.batch.included) == 6 and a.cams is None


def test_png_folder(tmp_path, lung_bundle):
    write_png_slices(tmp_path / "png", n=5, shape=(40, 56))
    with pytest.raises(UnsupportedInput, match="--organ lung"):
        dicompipe.analyze(tmp_path / "png", model=lung_bundle, allow_untrained=True)
    a = dicompipe.analyze(tmp_path / "png", organ="lung", model=lung_bundle, backend="torch",
                          allow_untrained=True, cam=False)
    assert a.volume.windowed and a.batch.pad == (8, 0, 56)
    assert a.verdict.region is None and a.verdict.key_slices[0].in_region is None   # no HU
    assert len(a.batch.slices) == 5                       # image slices: never averaged into slabs
    assert any("no physical spacing" in w for w in a.warnings)
    np.testing.assert_allclose(sum(a.verdict.probabilities.values()), 1.0, atol=1e-6)
    assert any("already-windowed" in w for w in a.warnings)


@pytest.mark.parametrize("lung_z,organ", [((0.0, 1.0), "lung"), ((2.0, 3.0), "pancreas")])
def test_organ_auto_from_content_without_header_hint(tmp_path, lung_z, organ):
    from dicompipe.pipeline import _resolve_organ
    write_ct_series(tmp_path / "ct", shape=(6, 40, 40), hu=chest_phantom((6, 40, 40), lung_z=lung_z),
                    body_part="", description="CT 3.0")
    chosen = dicompipe.io.select(dicompipe.io.discover(tmp_path / "ct"))
    got, why = _resolve_organ("auto", chosen, dicompipe.io.load(chosen))
    assert got == organ and "lung-air fraction" in why


def test_analyzer_loads_and_compiles_once_for_many_cases(chest_dir, lung_bundle, tmp_path, monkeypatch):
    from dicompipe.model import bundle as bundle_mod
    loads = []
    real_load = bundle_mod.load_bundle
    monkeypatch.setattr(bundle_mod, "load_bundle", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr("dicompipe.model.load_bundle", bundle_mod.load_bundle, raising=False)
    analyzer = dicompipe.Analyzer(model=lung_bundle, backend="torch", device="cpu",
                                  allow_untrained=True, out=tmp_path / "runs", history=False,
                                  formats="json")
    first = analyzer.run_case(chest_dir, organ="lung")
    second = analyzer.run_case(chest_dir, organ="auto")          # per-call keywords override
    assert first.ok and second.ok and first.run_dir != second.run_dir
    opened = [a[0] for a in loads if not isinstance(a[0], bundle_mod.Bundle)]
    assert len(opened) == 1                            # read and hashed once for both cases
    b = analyzer.bundles["lung"]
    assert list(b._backends) == [("torch", "cpu")]               # one compiled backend, kept
    assert second.analysis.verdict.probabilities == first.analysis.verdict.probabilities
    assert analyzer.analyze(chest_dir, organ="lung").verdict.label == first.analysis.verdict.label
