"""Explain stage: Grad-CAM (closed form from layer4, and an autograd path), 3D maps,
faithfulness checks.

Example::

    >>> from dicompipe import explain
    >>> cams = explain.gradcam(predictions)      # CamStack, all classes, no second pass
    >>> cams.volumes["malignant"]                # SimpleITK image on the source CT grid
"""
from dicompipe.explain.gradcam import (  # noqa: F401
    cam_slice,
    cam_volume,
    cam_volume_uint8,
    class_maps,
    display_scale,
    evidence_inside,
    gradcam,
    normalise_like_grad_cam,
    upsample,
)
from dicompipe.util import lazy_getattr

#: the torch parts (autograd Grad-CAM, faithfulness checks) are imported on first use, so
#: the ONNX Runtime / OpenVINO path never imports torch
_TORCH = {"autograd_cam": "autograd", "default_target_layer": "autograd",
          "deletion_insertion": "faithfulness", "randomisation_check": "faithfulness",
          "volume_faithfulness": "faithfulness"}


__getattr__ = lazy_getattr(__name__, _TORCH)
