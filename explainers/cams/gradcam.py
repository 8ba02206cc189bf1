"""Grad-CAM (Selvaraju et al., 2017): channel weight = spatial mean of the target's gradient."""
from __future__ import annotations

from explainers.cams.base import BaseCAM


class GradCAM(BaseCAM):
    def channel_weights(self, activation, grads, ctx):
        return grads.mean(dim=(3, 4))
