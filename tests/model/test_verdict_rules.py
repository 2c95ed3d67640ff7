"""Verdict rules (issue 13): the uncertain band, key slices = the slices that decided the
verdict for the deciding class (every aggregation rule), OOD slices left out of the
aggregate, "not assessable" volumes, and the confidence status tied to the model card."""
import numpy as np
import pytest
from tiny_bundle import chest_phantom, make_volume

from dicompipe.model import aggregate, softmax
from dicompipe.model.confidence import VALIDATION_BAR, assess, confidence_of, performance, performance_text
from dicompipe.preprocess import prepare
from dicompipe.types import NOT_ASSESSABLE, OodCheck, PreprocessSpec, SlicePredictions

LUNG = ("normal", "benign", "malignant")


@pytest.fixture(scope="module")
def batch():
    return prepare(make_volume(chest_phantom((7, 48, 48), lung_z=(0.0, 1.0))),
                   PreprocessSpec(windows=[(-600.0, 1500.0)], size=32), organ="lung")


def _preds(batch, p, labels=LUNG):
    logits = np.log(np.asarray(p, np.float64)).astype(np.float32)
    return SlicePredictions(labels=list(labels), logits=logits, probabilities=softmax(logits),
                            features=None, head_weight=np.zeros((len(labels), 8), np.float32),
                            head_bias=np.zeros(len(labels), np.float32), batch=batch)


# 7 slices, all clearly normal; the malignant evidence peaks on rows 5, 2, 6 (in that order)
NORMAL_P = np.array([[.96, .02, .02], [.97, .02, .01], [.92, .02, .06], [.97, .02, .01],
                     [.96, .02, .02], [.89, .02, .09], [.94, .02, .04]])


# --------------------------------------------------------------------------- uncertain band
@pytest.mark.parametrize("top,uncertain", [(0.398, True), (0.45, True), (0.599, True),
                                           (0.61, False), (0.95, False)])
def test_top_probability_at_or_below_the_band_is_uncertain(batch, top, uncertain):
    rest = (1 - top) / 2 - 0.001
    p = np.tile([rest, 1 - top - rest, top], (7, 1))         # mean rule: volume p = slice p
    v = aggregate(_preds(batch, p), rule="mean", uncertain_band=(0.4, 0.6))
    assert v.probabilities["malignant"] == pytest.approx(top, abs=1e-4)
    assert v.uncertain is uncertain


def test_issue_example_below_the_band(batch):
    # MALIGNANT 0.398 vs normal 0.252 / benign 0.349: below the band is not "certain"
    p = np.tile([0.252, 0.350, 0.398], (7, 1))
    v = aggregate(_preds(batch, p), rule="mean", uncertain_band=(0.4, 0.6))
    assert v.label == "malignant" and v.uncertain


# --------------------------------------------------------------------------- key slices
@pytest.mark.parametrize("rule,k,rows", [("topk_mean", 3, [5, 2, 6]), ("max", None, [5]),
                                         ("mean", 3, [5, 2, 6]), ("noisy_or", 2, [5, 2])])
def test_normal_verdict_key_slices_show_the_deciding_positive_evidence(batch, rule, k, rows):
    v = aggregate(_preds(batch, NORMAL_P), rule=rule, k=k)
    assert v.label == "normal" and v.model_label == "normal"
    # the "normal" score is what the malignant (strongest abnormal) evidence left over
    assert v.evidence_label == "malignant" and v.evidence == "malignant"
    assert [ks.row for ks in v.key_slices] == rows
    assert [ks.probability for ks in v.key_slices] == pytest.approx(NORMAL_P[rows, 2], abs=1e-5)


def test_topk_mean_key_slices_are_the_slices_of_the_score(batch):
    """Key slices reproduce the rule: their mean P(evidence) is the evidence class's score."""
    p = NORMAL_P.copy()
    v = aggregate(_preds(batch, p), rule="topk_mean", k=3)
    ks = [k.probability for k in v.key_slices]
    assert np.mean(ks) == pytest.approx(v.probabilities["malignant"], abs=1e-5)


@pytest.mark.parametrize("rule,k", [("topk_mean", 2), ("max", None), ("mean", 2), ("noisy_or", 2)])
def test_abnormal_verdict_key_slices_are_its_own_top_slices(batch, rule, k):
    p = np.array([[.1, .1, .8], [.8, .1, .1], [.2, .1, .7], [.6, .3, .1], [.1, .1, .8],
                  [.05, .05, .9], [.7, .2, .1]])
    v = aggregate(_preds(batch, p), rule=rule, k=k)
    assert v.label == v.evidence_label == "malignant"
    want = [5] if rule == "max" else [5, 0]
    assert [ks.row for ks in v.key_slices] == want


def test_binary_normal_verdict_names_tumour_evidence(batch):
    # the issue's abdomen example: tumour top-k mean is low, the verdict is normal, and the
    # key slices are the top-P(tumour) slices, not the top-P(normal) ones
    p = np.array([[.99, .01]] * 4 + [[.85, .15], [.9, .1], [.88, .12]])
    v = aggregate(_preds(batch, p, labels=("normal", "tumour")), rule="topk_mean", k=3)
    assert v.label == "normal" and v.evidence_label == "tumour"
    assert sorted(ks.row for ks in v.key_slices) == [4, 5, 6]


def test_evidence_class_with_two_abnormal_classes(batch):
    # normal wins; benign has more evidence than malignant -> benign's slices are the keys
    p = np.array([[.8, .15, .05], [.9, .05, .05], [.7, .25, .05], [.9, .05, .05],
                  [.9, .05, .05], [.9, .05, .05], [.9, .05, .05]])
    v = aggregate(_preds(batch, p), rule="max")
    assert v.label == "normal" and v.evidence_label == "benign"
    assert [k.row for k in v.key_slices] == [2]


# --------------------------------------------------------------------------- OOD in aggregate
def _ood(n, out, volume=False):
    return OodCheck(available=True, method="mahalanobis-ppca", scores=[1.0] * n,
                    slice_threshold=2.0, out_rows=list(out), volume_rule="more than half",
                    out_of_distribution=volume)


def test_out_of_distribution_slices_are_left_out(batch):
    p = np.array([[.05, .05, .9], [.9, .05, .05], [.9, .05, .05], [.9, .05, .05],
                  [.9, .05, .05], [.9, .05, .05], [.9, .05, .05]])
    pr = _preds(batch, p)
    assert aggregate(pr, rule="max").label == "malignant"
    v = aggregate(pr, rule="max", ood=_ood(7, [0]))
    assert v.label == "normal" and v.n_slices == 6 and v.assessable
    assert 0 not in [k.row for k in v.key_slices]


def test_out_of_distribution_volume_is_not_assessable(batch):
    v = aggregate(_preds(batch, NORMAL_P), rule="topk_mean", k=3,
                  ood=_ood(7, range(5), volume=True))
    assert v.label == NOT_ASSESSABLE == "not assessable" and not v.assessable
    assert v.reason == "input unlike the model's training data"
    assert v.model_label == "normal" and v.class_label == "normal"
    assert sum(v.probabilities.values()) == pytest.approx(1.0)     # shown for transparency
    assert v.n_slices == 7 and v.key_slices
    assert v.label not in v.probabilities                            # not a made-up class


# --------------------------------------------------------------------------- confidence
CARD_GOOD = {"trained": True, "metrics": {"evaluated_on": "some-data", "leak_free_test": {
    "n": 200, "macro_auroc": 0.9, "macro_auroc_ci95": [0.85, 0.94],
    "balanced_accuracy": 0.8, "balanced_accuracy_ci95": [0.74, 0.86]}}}


def _confident_verdict(batch, ood=None):
    p = np.tile([0.05, 0.05, 0.9], (7, 1))
    return aggregate(_preds(batch, p), rule="mean", ood=ood if ood is not None else _ood(7, []))


def test_confident_only_when_every_condition_holds(batch):
    v = _confident_verdict(batch)
    c = assess(v, CARD_GOOD, "HU DICOM")
    assert c.status == "confident" and c.reasons == []
    assert "0.70" in c.bar and VALIDATION_BAR == 0.70
    assert c.performance["balanced_accuracy"] == 0.8 and c.performance["data"] == "some-data"


def test_status_reasons(batch):
    v = _confident_verdict(batch)
    bad = {"trained": True, "metrics": {"leak_free_test": {"balanced_accuracy": 0.33}}}
    c = assess(v, bad)
    assert c.status == "model not validated on this kind of input" and "below the bar" in c.reasons[0]
    assert assess(v, {"trained": True, "metrics": {}}).status.startswith("model not validated")
    assert assess(v, {**CARD_GOOD, "trained": False}).status.startswith("model not validated")
    # no OOD model: whether the input is in distribution is unknown -> never "confident"
    no_ood = _confident_verdict(batch, OodCheck(available=False, note="not available"))
    assert assess(no_ood, CARD_GOOD).status == "model not validated on this kind of input"
    # measured on another input kind
    other = {"trained": True, "metrics": {"leak_free_test": {
        **CARD_GOOD["metrics"]["leak_free_test"], "input_kind": "8-bit slices"}}}
    assert assess(v, other, "HU DICOM").status.startswith("model not validated")
    assert assess(v, other, "8-bit slices").status == "confident"
    # uncertain
    unc = aggregate(_preds(batch, np.tile([0.3, 0.2, 0.5], (7, 1))), rule="mean", ood=_ood(7, []))
    c = assess(unc, CARD_GOOD)
    assert c.status == "uncertain" and "0.60" in c.reasons[0]
    # outside training data wins over everything else
    out = aggregate(_preds(batch, NORMAL_P), ood=_ood(7, range(6), volume=True))
    c = assess(out, bad)
    assert c.status == "outside training data" and len(c.reasons) >= 2


def test_performance_text_and_confidence_of_hand_built_analysis():
    from analysis_factory import make_analysis
    t = performance_text(performance(CARD_GOOD["metrics"]))
    assert "balanced accuracy 0.800 (95 % CI 0.740-0.860)" in t and "some-data" in t
    assert "n = 200" in t and "macro AUROC 0.900" in t
    assert performance_text(None).startswith("not measured")
    a = make_analysis()
    assert confidence_of(a).status == "model not validated on this kind of input"
