"""Model stage: ResNet50 bundles, inference backends, aggregation to a Verdict.

Example::

    >>> from dicompipe import model
    >>> bundle = model.load_bundle("lung-resnet50")
    >>> preds = model.predict(bundle, batch)
    >>> verdict = model.aggregate(preds, bundle=bundle)
"""
