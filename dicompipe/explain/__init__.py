"""Explain stage: Grad-CAM (closed form from layer4, and an autograd path), 3D maps,
faithfulness checks.

Example::

    >>> from dicompipe import explain
    >>> cams = explain.gradcam(predictions)      # CamStack, all classes, no second pass
    >>> cams.volumes["malignant"]                # SimpleITK image on the source CT grid
"""
from dicompipe.explain.autograd import autograd_cam, default_target_layer  # noqa: F401
from dicompipe.explain.faithfulness import (  # noqa: F401
    deletion_insertion,
    randomisation_check,
    volume_faithfulness,
)
from dicompipe.explain.gradcam import (  # noqa: F401
    cam_volume,
    class_maps,
    display_scale,
    gradcam,
    normalise_like_grad_cam,
    upsample,
)
