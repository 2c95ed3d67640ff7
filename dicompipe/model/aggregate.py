"""``aggregate``: per-slice scores -> one calibrated volume-level Verdict.

Slice probabilities are calibrated first: ``softmax(logits / T)`` with the bundle's
temperature T. Each abnormal class c (every label but the negative one, "normal" or the
first label) gets a volume score from the rule over its slice probabilities:

- ``topk_mean`` (default): mean of the k highest slice probabilities of c;
- ``max``: the highest; ``mean``: the mean over all slices;
- ``noisy_or``: 1 - prod(1 - p), the chance that at least one slice shows c.

The negative class gets ``1 - sum(abnormal scores)``; when the abnormal scores add up to
more than 1 they are rescaled to sum 1 (negative 0). With ``mean`` this is exactly the mean
probability vector. A volume is abnormal when a few slices clearly are, which a per-class
mean over a whole scan (mostly normal slices) would hide.

The verdict is uncertain when its top probability is at or below the band's upper end
(``top <= uncertain_band[1]``): a top probability below the band is no more certain.

Key slices are the slices that decided the verdict under the rule, for the deciding class
(``Verdict.evidence_label``): an abnormal verdict c is decided by c's slice probabilities;
a negative ("normal") verdict is decided by the abnormal scores being low, so its evidence
class is the abnormal class with the highest score (the closest contender). The key slices
are then the slices with the highest probability of that class: the k of ``topk_mean``, the
one of ``max``, and for ``mean``/``noisy_or`` (every slice counts) the k contributing most.

With an organ region (lung: the lung fields, ``preprocess.region``) the slices are ranked by
the class's Grad-CAM mass inside the region (ties by probability): a slice whose evidence
lies outside the organ (the liver dome or the stomach's gas under the lungs) is not taken
for the tumour, and a tumour's local evidence is not diluted, as in the probability, by the
rest of the slice and the competing classes. ``topk_mean``/``max`` then average the
probabilities of the top-ranked slices; ``mean``/``noisy_or`` scores do not change, only the
key slices.

With an :class:`OodCheck` (``model.ood.check``) slices out of distribution are left out of
the aggregate; a volume out of distribution gets the label "not assessable" with the reason
"input unlike the model's training data", and its probabilities (over all slices) are the
model's output shown for transparency only.

Example::

    >>> v = aggregate(preds, bundle=bundle)                 # the bundle's rule and temperature
    >>> v.label, v.probabilities, v.uncertain, v.key_slices[0].instance_numbers
    >>> v.evidence_label                                    # whose evidence the key slices show
    >>> aggregate(preds, rule="noisy_or", temperature=1.5)
"""
from __future__ import annotations

import numpy as np

from dicompipe.errors import ModelError
from dicompipe.types import (  # noqa: F401  (softmax: public here too)
    NOT_ASSESSABLE,
    KeySlice,
    OodCheck,
    SlicePredictions,
    Verdict,
    softmax,
)

RULES = ("topk_mean", "max", "mean", "noisy_or")
NEGATIVE_NAMES = ("normal", "negative", "benign_or_normal", "healthy")
OOD_REASON = "input unlike the model's training data"


def negative_index(labels: list[str]) -> int:
    """Index of the "no finding" class: a label named normal/negative, else the first label."""
    for i, l in enumerate(labels):
        if l.lower() in NEGATIVE_NAMES:
            return i
    return 0


def ranking(p: np.ndarray, evidence: np.ndarray | None) -> np.ndarray:
    """Slices (rows of ``p``) of each class, most evidence first: by probability, or by
    ``evidence`` (each slice's class evidence inside the organ region), ties by probability,
    then slice order. Returns (n, K) indices.

    >>> ranking(np.array([[.1, .9], [.3, .7]]), np.array([[1., .2], [1., .5]]))[:, 1]
    array([1, 0])
    """
    if evidence is None:
        return np.argsort(-p, axis=0, kind="stable")
    return np.stack([np.lexsort((-p[:, c], -evidence[:, c])) for c in range(p.shape[1])], axis=1)


def class_scores(p: np.ndarray, rule: str, k: int, neg: int,
                 order: np.ndarray | None = None) -> np.ndarray:
    """Volume score per class from calibrated slice probabilities ``p`` (n, K); sums to 1.
    ``topk_mean`` and ``max`` take their slices in ``order`` (:func:`ranking`; default: by
    probability), e.g. the slices with the most evidence inside the organ.

    >>> class_scores(np.array([[.9, .1], [.2, .8]]), "max", 1, 0)
    array([0.2, 0.8])
    """
    kk = min(k, len(p))
    order = ranking(p, None) if order is None else order
    scores = np.zeros(p.shape[1])
    for c in range(p.shape[1]):
        if c == neg:
            continue
        col = p[:, c]
        if rule == "topk_mean":
            scores[c] = col[order[:kk, c]].mean()
        elif rule == "max":
            scores[c] = col[order[0, c]]
        elif rule == "mean":
            scores[c] = col.mean()
        else:
            scores[c] = 1.0 - np.prod(1.0 - col)
    total = scores.sum()
    if total > 1.0:
        scores /= total
    scores[neg] = max(0.0, 1.0 - scores.sum())
    return scores / scores.sum()


def evidence_class(scores: np.ndarray, neg: int) -> int:
    """The class whose slice evidence decided the verdict: the winner when it is abnormal,
    else the abnormal class with the highest score (what the "normal" score was left from).

    >>> evidence_class(np.array([0.8, 0.05, 0.15]), 0)
    2
    """
    best = int(np.argmax(scores))
    if best != neg or len(scores) < 2:
        return best
    others = [c for c in range(len(scores)) if c != neg]
    return max(others, key=lambda c: scores[c])


def aggregate(preds: SlicePredictions, *, bundle=None, rule: str | None = None,
              k: int | None = None, temperature: float | None = None,
              uncertain_band=None, ood: OodCheck | None = None,
              region_evidence: np.ndarray | None = None, region_share: np.ndarray | None = None,
              region: str | None = None) -> Verdict:
    """Volume verdict from slice predictions; arguments override the bundle's defaults.

    ``ood``: the slices' out-of-distribution check; out slices are left out, and an out
    volume's verdict is "not assessable" (see the module doc).
    ``region_evidence``, ``region_share``: (n, K) Grad-CAM mass of each class on each slice
    inside the organ region ``region`` (a description, e.g. the lung fields), and the share
    of the map inside it (``explain.evidence_inside``); slices are then ranked by that
    evidence (see :func:`ranking`), so evidence outside the organ ranks last. Both are kept
    in the verdict; each key slice shows its share.

    >>> v = aggregate(preds, rule="topk_mean", k=5, temperature=1.2, uncertain_band=(0.4, 0.6))
    """
    defaults = dict(bundle.aggregation) if bundle is not None else {}
    rule = rule or defaults.get("rule") or "topk_mean"
    k = int(k if k is not None else defaults.get("k") or 5)
    band = tuple(float(b) for b in (uncertain_band if uncertain_band is not None
                                    else defaults.get("uncertain_band") or (0.4, 0.6)))
    temp = float(temperature if temperature is not None
                 else (bundle.temperature if bundle is not None else 1.0))
    if rule not in RULES:
        raise ModelError(f"Unknown aggregation rule {rule!r}: use one of {', '.join(RULES)}.")
    if k < 1:
        raise ModelError(f"Aggregation k must be >= 1, got {k}.")
    if not temp > 0:
        raise ModelError(f"Calibration temperature must be > 0, got {temp}.")
    if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
        raise ModelError(f"uncertain_band must be (low, high) within [0, 1], got {band}.")
    labels = list(preds.labels)
    n = len(preds.logits)
    if n == 0:
        raise ModelError("No analysed slice to aggregate (every slice was skipped).")

    p_all = softmax(np.asarray(preds.logits, np.float64) / temp).astype(np.float64)
    assessable = not (ood is not None and ood.available and ood.out_of_distribution)
    rows = np.arange(n)
    if assessable and ood is not None and ood.available and ood.out_rows:
        rows = np.setdiff1d(rows, np.asarray(ood.out_rows, int))
        if len(rows) == 0:      # cannot happen with a sane volume rule; be explicit anyway
            raise ModelError("Every analysed slice is out of distribution, but the volume rule "
                             "did not mark the volume: check the bundle's OOD volume rule.")
    p = p_all[rows]
    in_region = {}
    for name, v in (("region_evidence", region_evidence), ("region_share", region_share)):
        if v is not None:
            in_region[name] = np.asarray(v, np.float64)
            if in_region[name].shape != p_all.shape:
                raise ModelError(f"{name} must be (n_slices, n_classes) = {p_all.shape}, "
                                 f"got {in_region[name].shape}.")
    if len(in_region) == 1:
        raise ModelError("region_evidence and region_share come together (explain.evidence_inside).")
    evidence = in_region["region_evidence"][rows] if in_region else None
    neg = negative_index(labels)
    kk = min(k, len(rows))
    ranked = ranking(p, evidence)
    scores = class_scores(p, rule, k, neg, ranked)
    best = int(np.argmax(scores))
    top = float(scores[best])
    uncertain = top <= band[1]
    ev = evidence_class(scores, neg)
    n_key = 1 if rule == "max" else kk
    order = rows[ranked[:n_key, ev]]
    by_row = {s.row: s for s in preds.batch.slices if s.included}
    keys = []
    for r in order:
        s = by_row.get(int(r))
        if s is None:
            continue
        keys.append(KeySlice(
            row=int(r), z=s.z, volume_z=list(s.volume_z),
            instance_numbers=[i.instance_number for i in s.sources],
            sop_instance_uids=[i.sop_instance_uid for i in s.sources],
            files=[i.file for i in s.sources], probability=float(p_all[r, ev]),
            in_region=float(in_region["region_share"][r, ev]) if in_region else None))
    return Verdict(label=labels[best] if assessable else NOT_ASSESSABLE,
                   probabilities={l: float(v) for l, v in zip(labels, scores)},
                   uncertain=bool(uncertain), uncertain_band=band,
                   rule=f"topk_mean(k={k})" if rule == "topk_mean" else rule,
                   temperature=temp, key_slices=keys, n_slices=len(rows),
                   evidence_label=labels[ev], model_label=labels[best],
                   assessable=assessable, reason=None if assessable else OOD_REASON, ood=ood,
                   region=region if in_region else None,
                   **{name: {l: [float(f"{x:.4f}" if name == "region_share" else f"{x:.6g}")
                                 for x in v[:, c]]
                             for c, l in enumerate(labels) if c != neg}
                      for name, v in in_region.items()})
