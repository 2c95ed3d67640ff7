"""Issue 13 end to end: a tiny bundle with an OOD model refuses a pure-noise CT volume as
"not assessable" (CLI exit code 0, stated in report.txt, analysis.json and the UI card) and
still gives a verdict for a chest phantom like the ones it was fitted on."""
import json

import numpy as np
import pytest
from synth import write_ct_series
from tiny_bundle import chest_phantom, make_bundle, make_volume

import dicompipe
from dicompipe.cli import main
from dicompipe.model import load_bundle, predict
from dicompipe.model.ood import fit_ood, save_ood
from dicompipe.preprocess import prepare
from dicompipe.types import PreprocessSpec

SPEC = PreprocessSpec(windows=[(-600.0, 1500.0), (40.0, 400.0), (-160.0, 240.0)], size=64,
                      slab_mm=5.0)
GOOD_CARD = {"evaluated_on": "synthetic phantoms", "leak_free_test": {
    "n": 100, "macro_auroc": 0.95, "macro_auroc_ci95": [0.9, 0.98],
    "balanced_accuracy": 0.9, "balanced_accuracy_ci95": [0.85, 0.95]}}


@pytest.fixture(scope="module")
def ood_bundle(tmp_path_factory):
    path = make_bundle(tmp_path_factory.mktemp("b") / "lung-ood", organ="lung", spec=SPEC,
                       favour="malignant", trained=True)
    md_file = path / "configs/metadata.json"
    md = json.loads(md_file.read_text())
    md["metrics"] = GOOD_CARD                   # a card that meets the bar, for the badge
    md_file.write_text(json.dumps(md))
    b = load_bundle(path)
    feats = []
    for seed in range(12):                       # "training data": chest phantoms
        vol = make_volume(chest_phantom((12, 48, 48), lung_z=(0.0, 1.0), seed=seed),
                          spacing=(0.8, 0.8, 2.5))
        preds = predict(b, prepare(vol, SPEC, organ="lung", select_slices=False),
                        backend="torch", device="cpu")
        feats.append(preds.features)
    f = np.concatenate(feats)
    save_ood(path, fit_ood(f, np.zeros(len(f), int), n_components=16),
             fitted_on="synthetic chest phantoms (test)")
    return path


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "noise"
    hu = np.random.default_rng(0).uniform(-1000, 1000, (12, 48, 48)).astype(np.float32)
    write_ct_series(d, shape=(12, 48, 48), spacing=(0.8, 0.8, 2.5), hu=hu, body_part="CHEST")
    return d


@pytest.fixture(scope="module")
def chest_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "chest"
    write_ct_series(d, shape=(12, 48, 48), spacing=(0.8, 0.8, 2.5),
                    hu=chest_phantom((12, 48, 48), lung_z=(0.0, 1.0), seed=11), body_part="CHEST")
    return d


def test_in_distribution_volume_gets_a_verdict(chest_dir, ood_bundle):
    a = dicompipe.analyze(chest_dir, organ="lung", model=ood_bundle, backend="torch",
                          device="cpu", cam=False)
    v = a.verdict
    assert v.assessable and v.label == "malignant" and v.ood.available
    assert not v.ood.out_of_distribution and len(v.ood.scores) == len(a.batch.included)
    assert v.confidence.status == "confident", v.confidence.reasons
    d = a.to_dict()
    assert d["verdict"]["confidence"]["status"] == "confident"
    assert all("ood_score" in r for r in d["slices"] if r["included"])


def test_noise_volume_is_not_assessable(noise_dir, ood_bundle):
    a = dicompipe.analyze(noise_dir, organ="lung", model=ood_bundle, backend="torch",
                          device="cpu", cam=False, select_slices=False)
    v = a.verdict
    assert v.label == "not assessable" and not v.assessable
    assert v.reason == "input unlike the model's training data"
    assert v.ood.out_of_distribution and len(v.ood.out_rows) > len(v.ood.scores) / 2
    assert v.confidence.status == "outside training data"
    assert sum(v.probabilities.values()) == pytest.approx(1.0)      # still reported
    assert any(w.startswith("Not assessable") for w in a.warnings)
    from dicompipe.ui.views import verdict_card_html
    card = verdict_card_html(a)
    assert "outside training data" in card and "Not Assessable" in card
    assert "transparency only" in card and "balanced accuracy 0.900" in card
    assert "ranked by its Grad-CAM in the lung fields" in card and v.region.startswith("lung fields")
    v.region = None
    assert "ranked by P(malignant)" in verdict_card_html(a)


def test_cli_exits_0_and_every_output_says_so(noise_dir, ood_bundle, tmp_path, capsys):
    rc = main(["analyze", str(noise_dir), "--organ", "lung", "--model", str(ood_bundle),
               "--out", str(tmp_path / "runs"), "--quiet", "--no-history", "--no-cam",
               "--all-slices", "--backend", "torch", "--device", "cpu", "--format", "json,txt"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "NOT ASSESSABLE (input unlike the model's training data)" in out
    assert "confidence: outside training data" in out
    run = next((tmp_path / "runs").iterdir())
    d = json.loads((run / "analysis.json").read_text())
    zs = ", ".join(str(k["z"]) for k in d["verdict"]["key_slices"])
    assert f"key slices: z {zs} (z from 0; evidence for malignant, ranked by its Grad-CAM in the lung fields)" in out
    assert d["verdict"]["label"] == "not assessable" and d["verdict"]["assessable"] is False
    assert d["verdict"]["reason"] == "input unlike the model's training data"
    assert d["verdict"]["confidence"]["status"] == "outside training data"
    assert d["verdict"]["ood"]["out_of_distribution"] is True
    assert d["verdict"]["confidence"]["performance"]["balanced_accuracy"] == 0.9
    rows = [r for r in d["slices"] if r["included"]]
    assert all("ood_score" in r for r in rows)
    assert (sum(r["excluded_reason"] == "out of distribution" for r in rows)
            == len(d["verdict"]["ood"]["out_rows"]))
    txt = (run / "report.txt").read_text()
    assert "NOT ASSESSABLE: input unlike the model's training data" in txt
    assert "transparency only" in txt and "OUT OF DISTRIBUTION" in txt
    assert "Confidence status:    outside training data" in txt


@pytest.mark.parametrize("kind", ["abdomen given as lung", "MR-like contrast"])
def test_unlike_volumes_are_not_assessable(kind, ood_bundle, tmp_path):
    chest = chest_phantom((12, 48, 48), lung_z=(0.0, 1.0), seed=21)
    hu = (chest_phantom((12, 48, 48), lung_z=(2.0, 3.0), seed=21) if kind.startswith("abdomen")
          else np.where(chest < -900, -1000, 300 - (chest + 850) * 0.8).astype(np.float32))
    write_ct_series(tmp_path / "ct", shape=(12, 48, 48), spacing=(0.8, 0.8, 2.5), hu=hu,
                    body_part="CHEST")
    a = dicompipe.analyze(tmp_path / "ct", organ="lung", model=ood_bundle, backend="torch",
                          device="cpu", cam=False, select_slices=False)
    assert a.verdict.label == "not assessable"
    assert min(a.verdict.ood.scores) > a.verdict.ood.slice_threshold
