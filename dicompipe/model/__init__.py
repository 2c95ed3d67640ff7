"""Model stage: ResNet50 bundles, inference backends, aggregation to a Verdict.

Example::

    >>> from dicompipe import model
    >>> bundle = model.load_bundle("lung-resnet50")
    >>> preds = model.predict(bundle, batch)
    >>> verdict = model.aggregate(preds, bundle=bundle)
"""
from dicompipe.model.bundle import (  # noqa: F401
    Bundle, available_bundles, load_bundle, resnet50_from_torchvision, save_bundle,
)
from dicompipe.model.network import resnet50  # noqa: F401
from dicompipe.model.aggregate import aggregate, softmax  # noqa: F401,E402
from dicompipe.model.backends import get_backend  # noqa: F401,E402
from dicompipe.model.predict import predict  # noqa: F401,E402
