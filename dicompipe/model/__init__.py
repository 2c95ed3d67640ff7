"""Model stage: ResNet50 bundles, inference backends, aggregation to a Verdict.

Example::

    >>> from dicompipe import model
    >>> bundle = model.load_bundle("lung-resnet50")
    >>> preds = model.predict(bundle, batch)
    >>> verdict = model.aggregate(preds, bundle=bundle)
"""
# numpy-only, imported now (the function shadows its module's name, as before)
from dicompipe.model.aggregate import aggregate, softmax  # noqa: E402,F401
from dicompipe.util import lazy_getattr

# the torch/MONAI parts are imported on first use, so that serialising an Analysis
# (aggregate.softmax) does not pull in torch
_PUBLIC = {
    "Bundle": "bundle", "available_bundles": "bundle", "load_bundle": "bundle",
    "resnet50_from_torchvision": "bundle", "save_bundle": "bundle",
    "resnet50": "network",
    "get_backend": "backends", "predict": "inference",
    "fit_ood": "ood", "save_ood": "ood", "load_ood": "ood", "OodModel": "ood",
    "assess": "confidence",
}
__all__ = sorted([*_PUBLIC, "aggregate", "softmax"])


__getattr__ = lazy_getattr(__name__, _PUBLIC)
