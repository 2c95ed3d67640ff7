"""Explain stage: Grad-CAM (closed form from layer4, and an autograd path), 3D maps.

Example::

    >>> from dicompipe import explain
    >>> cams = explain.gradcam(predictions)      # CamStack, all classes, no second pass
"""
