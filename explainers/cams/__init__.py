"""CAM methods. Each file holds one method; `base.py` holds what they share."""
from explainers.cams.base import BaseCAM, CAMResult, minmax
from explainers.cams.cam import CAM
from explainers.cams.gradcam import GradCAM

METHODS = {
    "cam": CAM,
    "gradcam": GradCAM,
}

__all__ = ["BaseCAM", "CAM", "CAMResult", "GradCAM", "METHODS", "minmax"]
