"""Layer-CAM (Jiang et al., 2021): each position's activation weighted by its own positive gradient.

    map_k(i,j) = ReLU( sum_c ReLU(g_kc(i,j)) * A_c(i,j) )

Unlike Grad-CAM there is no spatial averaging of gradients, so shallow layers give fine maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from explainers.cams.base import BaseCAM


class LayerCAM(BaseCAM):
    def layer_map(self, activation, grads, ctx):
        return F.relu(torch.einsum("bkchw,bchw->bkhw", grads.clamp_min(0), activation))
