"""Confidence tied to evidence: one status per verdict, from the verdict, the slices' OOD
check and the bundle's own measured test performance (its model card's ``metrics``).

Statuses (worst first; ``Confidence.reasons`` lists every one that applies):

- "outside training data": the volume is out of distribution (verdict "not assessable");
- "model not validated on this kind of input": the bundle is untrained, its card has no
  leak-free test result, that result is below :data:`VALIDATION_BAR`, it was measured on
  another input kind, or the bundle has no OOD model (so "in distribution" is unknown);
- "uncertain": the top probability is at or below the uncertain band's upper end;
- "confident": none of the above.

Example::

    >>> c = assess(verdict, bundle.card(), input_kind="HU DICOM")
    >>> c.status, c.reasons, performance_text(c.performance)
"""
from __future__ import annotations

from dicompipe.types import Confidence, Verdict

VALIDATION_BAR = 0.70
"""Balanced accuracy a bundle must reach on its leak-free test (``metrics.leak_free_test``,
point estimate) before any of its verdicts may be called "confident".

Chance is 1/K (0.33 for lung's three classes, 0.50 for pancreas's two); 0.70 is a modest
bar that a model which learned the task clears and one near chance does not. It says
nothing about clinical use (see the disclaimer on every output)."""
BAR_METRIC = "balanced_accuracy"
TEST_SPLITS = ("leak_free_test", "test")      # first one found in metrics is used
STATUSES = ("outside training data", "model not validated on this kind of input",
            "uncertain", "confident")


def bar_text() -> str:
    return (f"{BAR_METRIC.replace('_', ' ')} >= {VALIDATION_BAR:.2f} on the bundle's "
            "leak-free test")


def performance(metrics: dict | None) -> dict | None:
    """The measured test performance to show beside a verdict, or None when not recorded.

    >>> performance(bundle.metadata["metrics"])["balanced_accuracy"]
    """
    metrics = metrics or {}
    for split in TEST_SPLITS:
        m = metrics.get(split)
        if isinstance(m, dict) and m.get(BAR_METRIC) is not None:
            keys = ("n", "macro_auroc", "macro_auroc_ci95", "balanced_accuracy",
                    "balanced_accuracy_ci95", "input_kind")
            return {"split": split, "data": m.get("data") or metrics.get("evaluated_on"),
                    **{k: m.get(k) for k in keys}}
    return None


def performance_text(perf: dict | None) -> str:
    """One line: what was measured, on which data, with 95 % intervals.

    >>> performance_text({"split": "leak_free_test", "data": "iq-othnccd", "n": 199,
    ...                   "macro_auroc": 0.75, "macro_auroc_ci95": [0.70, 0.80],
    ...                   "balanced_accuracy": 0.33, "balanced_accuracy_ci95": [0.32, 0.33]})
    'macro AUROC 0.750 (95 % CI 0.700-0.800), balanced accuracy 0.330 (95 % CI 0.320-0.330);
     leak_free_test of iq-othnccd, n = 199'
    """
    if not perf:
        return "not measured: the bundle's card records no test performance"

    def one(name, key):
        v, ci = perf.get(key), perf.get(f"{key}_ci95")
        if v is None:
            return f"{name} not recorded"
        return f"{name} {v:.3f}" + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    where = f"{perf['split']} of {perf.get('data') or 'unrecorded data'}"
    if perf.get("n"):
        where += f", n = {perf['n']}"
    if perf.get("input_kind"):
        where += f", {perf['input_kind']}"
    return f"{one('macro AUROC', 'macro_auroc')}, {one('balanced accuracy', 'balanced_accuracy')}; {where}"


def assess(verdict: Verdict, card: dict | None, input_kind: str | None = None) -> Confidence:
    """The confidence status of ``verdict`` given the bundle's card (``Bundle.card()``).

    >>> assess(v, {"trained": True, "metrics": {"leak_free_test": {"balanced_accuracy": 0.8}}})
    """
    card = card or {}
    perf = performance(card.get("metrics"))
    reasons: list[str] = []
    ood = verdict.ood
    if not verdict.assessable or (ood is not None and ood.out_of_distribution):
        n_out = len(ood.out_rows) if ood is not None else 0
        n_all = len(ood.scores) if ood is not None else 0
        reasons.append(f"outside training data: {verdict.reason or 'input unlike the training data'}"
                       + (f" ({n_out} of {n_all} analysed slices out of distribution)"
                          if n_all else ""))
    why_not = "model not validated on this kind of input: "
    if card.get("trained") is False:
        reasons.append(why_not + "the bundle is untrained (random weights)")
    elif perf is None:
        reasons.append(why_not + "the bundle's card records no leak-free test result")
    elif perf[BAR_METRIC] < VALIDATION_BAR:
        reasons.append(why_not + f"{BAR_METRIC.replace('_', ' ')} {perf[BAR_METRIC]:.2f} on its "
                       f"{perf['split']} is below the bar {VALIDATION_BAR:.2f}")
    elif perf.get("input_kind") and input_kind and perf["input_kind"] != input_kind:
        reasons.append(why_not + f"its test was measured on {perf['input_kind']}, "
                       f"this input is {input_kind}")
    if ood is None or not ood.available:
        reasons.append(why_not + "the bundle has no out-of-distribution check, so whether "
                       "this input is like its training data is unknown")
    if verdict.assessable and verdict.uncertain:
        top = verdict.probabilities.get(verdict.class_label, 0.0)
        reasons.append(f"uncertain: top probability {top:.2f} is at or below "
                       f"{verdict.uncertain_band[1]:.2f} (the uncertain band's upper end)")
    status = "confident"
    for s in STATUSES:
        if any(r.startswith(s + ":") for r in reasons):
            status = s
            break
    return Confidence(status=status, reasons=reasons, performance=perf, bar=bar_text())


def confidence_of(analysis) -> Confidence:
    """``analysis.verdict.confidence``, or assessed now (hand-built or older analyses).

    >>> confidence_of(a).status
    """
    v = analysis.verdict
    if v.confidence is not None:
        return v.confidence
    from dicompipe.model.calibration import input_kind
    return assess(v, analysis.model, input_kind(analysis.volume.windowed))
