"""CAM methods. Each file holds one method; `base.py` holds what they share."""
from explainers.cams.base import BaseCAM, CAMResult, minmax
from explainers.cams.cam import CAM
from explainers.cams.gradcam import GradCAM
from explainers.cams.gradcam_pp import GradCAMPlusPlus
from explainers.cams.layercam import LayerCAM
from explainers.cams.scorecam import ScoreCAM

METHODS = {
    "cam": CAM,
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "gradcampp": GradCAMPlusPlus,
    "scorecam": ScoreCAM,
    "layercam": LayerCAM,
}

__all__ = ["BaseCAM", "CAM", "CAMResult", "GradCAM", "GradCAMPlusPlus", "LayerCAM", "METHODS", "ScoreCAM",
           "minmax"]
