"""Faithfulness checks for CAMs, run on demand (they cost extra forward passes).

- :func:`deletion_insertion` (Petsiuk et al., RISE, 2018): remove the most salient pixels
  first and watch the class probability fall (deletion AUC, lower = more faithful), or
  insert them into a blurred image and watch it rise (insertion AUC, higher = better).
  The same curves with a random pixel order give the reference a map must beat.
- :func:`volume_faithfulness`: those AUCs for one analysed volume (its most confident
  slices), stored in ``CamStack.faithfulness``.
- :func:`randomisation_check` (Adebayo et al., "Sanity checks for saliency maps", 2018):
  maps of the trained model vs. a model whose top layers were re-initialised, cascading
  down; a map that ignores the weights would keep a rank correlation near 1.

Example::

    >>> f = volume_faithfulness(net, preds, cams, label="malignant")
    >>> f["deletion_auc"] < f["deletion_auc_random"]
    >>> randomisation_check(net, x)          # {"fc": 0.1, "layer4": 0.05, ...} Spearman
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dicompipe.errors import ModelError
from dicompipe.explain.autograd import autograd_cam, default_target_layer
from dicompipe.explain.gradcam import upsample
from dicompipe.types import CamStack, SlicePredictions


def _as_model(model) -> Callable:
    """A torch module (eval mode), a callable x -> logits, or a bundle (its network)."""
    if hasattr(model, "network") and callable(model.network):
        model = model.network()
    if isinstance(model, torch.nn.Module):
        model.eval()
    return model


def _probabilities(model: Callable, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.softmax(torch.as_tensor(out).float(), dim=1).cpu().numpy()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _baseline(x: torch.Tensor, baseline) -> torch.Tensor:
    if baseline == "blur":
        return _blur(x, sigma=x.shape[-1] / 14.0)          # about one layer4 cell
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    return torch.full_like(x, float(baseline))


def deletion_insertion(model: Callable, x, saliency, target, *, steps: int = 16,
                       baseline: str | float = "blur", order: str = "saliency",
                       batch_size: int = 32, seed: int = 0) -> dict:
    """Deletion and insertion curves and AUCs for images ``x`` (n, C, H, W) and maps (n, h, w).

    ``model``: a torch module, a callable x -> logits, or a model bundle.
    ``target``: class index (or one per image). ``order``: "saliency" (most salient first)
    or "random" (the reference). Pixels are removed/inserted in all channels at once;
    ``baseline`` is "blur", "mean" or a constant. AUCs are the mean over images of the
    trapezoid area under probability vs. fraction of pixels (0..1).

    Example::

        >>> r = deletion_insertion(net, x, maps, target=2, steps=8)
        >>> r["deletion_auc"], r["insertion_auc"]
    """
    if order not in ("saliency", "random"):
        raise ValueError(f"order must be 'saliency' or 'random', not {order!r}")
    model = _as_model(model)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    n, c, hh, ww = x.shape
    sal = upsample(np.asarray(saliency, dtype=np.float32), (hh, ww)).reshape(n, -1)
    targets = np.broadcast_to(np.asarray(target, dtype=int), (n,))
    rng = np.random.default_rng(seed)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    base = _baseline(x, baseline)
    curves = {"deletion": np.zeros((n, steps + 1)), "insertion": np.zeros((n, steps + 1))}
    for i in range(n):
        tie = rng.random(hh * ww)                    # random tie-break (ReLU maps have flat zeros)
        rank = np.lexsort((tie, -sal[i])) if order == "saliency" else rng.permutation(hh * ww)
        masks = np.zeros((steps + 1, hh * ww), np.float32)
        for s, f in enumerate(fractions):
            masks[s, rank[:int(round(f * hh * ww))]] = 1.0
        m = torch.from_numpy(masks).view(steps + 1, 1, hh, ww)
        for kind in ("deletion", "insertion"):
            keep = (1 - m) if kind == "deletion" else m
            imgs = keep * x[i:i + 1] + (1 - keep) * base[i:i + 1]
            probs = np.concatenate([_probabilities(model, imgs[j:j + batch_size])
                                    for j in range(0, len(imgs), batch_size)])
            curves[kind][i] = probs[:, targets[i]]
    trap = getattr(np, "trapezoid", None) or np.trapz
    return {
        "deletion_auc": float(np.mean([trap(cv, fractions) for cv in curves["deletion"]])),
        "insertion_auc": float(np.mean([trap(cv, fractions) for cv in curves["insertion"]])),
        "deletion_curve": curves["deletion"].mean(0), "insertion_curve": curves["insertion"].mean(0),
        "fractions": fractions,
    }


def volume_faithfulness(model: Callable, predictions: SlicePredictions, cams: CamStack,
                        label: str | None = None, *, max_slices: int = 8, steps: int = 16,
                        baseline: str | float = "blur", random_reference: bool = True,
                        seed: int = 0) -> dict[str, float]:
    """Deletion/insertion AUCs for one analysed volume; also stored in ``cams.faithfulness``.

    Uses the ``max_slices`` slices with the highest probability of ``label`` (default: the
    label with the highest mean slice probability). With ``random_reference`` the AUCs of a
    random pixel order are added (``*_random``): a faithful map deletes faster (lower
    deletion AUC) and inserts faster (higher insertion AUC) than random.

    Example::

        >>> volume_faithfulness(net, preds, cams, "malignant")
        {'deletion_auc': 0.12, 'insertion_auc': 0.61, 'deletion_auc_random': 0.35, ...}
    """
    probs = np.asarray(predictions.probabilities)
    if len(probs) == 0:
        raise ModelError("No analysed slices: nothing to measure faithfulness on.")
    if label is None:
        label = predictions.labels[int(np.argmax(probs.mean(0)))]
    if label not in cams.labels or label not in predictions.labels:
        raise ModelError(f"No CAM for {label!r}: the CamStack holds {cams.labels}.")
    k_pred, k_cam = predictions.labels.index(label), cams.labels.index(label)
    rows = np.argsort(-probs[:, k_pred], kind="stable")[:max_slices]
    x = np.asarray(predictions.batch.tensors)[rows]
    sal = cams.maps[rows, k_cam]
    r = deletion_insertion(model, x, sal, k_pred, steps=steps, baseline=baseline, seed=seed)
    out = {"deletion_auc": r["deletion_auc"], "insertion_auc": r["insertion_auc"],
           "n_slices": float(len(rows)), "steps": float(steps)}
    if random_reference:
        rr = deletion_insertion(model, x, sal, k_pred, steps=steps, baseline=baseline,
                                order="random", seed=seed)
        out["deletion_auc_random"] = rr["deletion_auc"]
        out["insertion_auc_random"] = rr["insertion_auc"]
    cams.faithfulness = out
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (ties get average ranks); nan if one is constant."""
    from scipy.stats import rankdata
    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _reinitialise(module: torch.nn.Module, generator_seed: int) -> None:
    torch.manual_seed(generator_seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            m.reset_parameters()


def _has_submodule(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def randomisation_check(model: torch.nn.Module, x, classes: Sequence[int] | None = None, *,
                        layers: Sequence[str] = ("fc", "layer4", "layer3", "layer2", "layer1"),
                        cascading: bool = True, method: str = "gradcam",
                        seed: int = 0) -> dict[str, float]:
    """Model-randomisation sanity check: Spearman rho between trained and randomised maps.

    For each name in ``layers`` (top first), a copy of the model gets that layer's conv/linear
    weights re-initialised (``cascading``: plus all layers before it in the list); the maps
    (autograd path, target ``layer4[-1]``) of every image and class are compared with the
    trained model's by Spearman rank correlation; the mean is reported per layer. Values
    near 1 would mean the explanation does not depend on the learned weights.

    Example::

        >>> randomisation_check(net, x[:4])
        {'fc': 0.21, 'layer4': 0.03, 'layer3': -0.01, 'layer2': 0.05, 'layer1': 0.02}
    """
    missing = [n for n in layers if not _has_submodule(model, n)]
    if missing:
        raise ModelError(f"randomisation_check: {type(model).__name__} has no layer(s) "
                         f"{', '.join(missing)}; pass layers= with names from named_modules().")
    ref = autograd_cam(model, x, classes, method=method)
    out: dict[str, float] = {}
    done: list[str] = []
    for i, name in enumerate(layers):
        net = copy.deepcopy(model)
        targets = (done + [name]) if cascading else [name]
        for t in targets:
            _reinitialise(net.get_submodule(t), seed + i)
        maps = autograd_cam(net, x, classes, method=method, target_layer=default_target_layer(net))
        rhos = [spearman(ref[n, k], maps[n, k]) for n in range(ref.shape[0])
                for k in range(ref.shape[1])]
        out[name] = float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan")
        done.append(name)
    return out
