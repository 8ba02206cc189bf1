"""CAM (Zhou et al., 2016): channel weights are the final linear layer's weights of the target class.

Valid where the target layer feeds global average pooling and then one linear layer. A class set
is weighted by the softmax of its members' logits (the gradient of their log-sum-exp), so CAM and
Grad-CAM agree up to a positive factor on such heads.
"""
from __future__ import annotations

import torch
from torch import nn

from explainers.cams.base import BaseCAM
from explainers.hooks import get_layer


class CAM(BaseCAM):
    needs_gradients = False

    def __init__(self, model, target_layers=None, head=None):
        super().__init__(model, target_layers, head)
        if self.head is None:
            raise ValueError("CAM needs the name of the final linear layer (head=...)")
        fc = get_layer(self.model, self.head)
        if not isinstance(fc, nn.Linear):
            raise ValueError(f"CAM head {self.head!r} is a {type(fc).__name__}, not nn.Linear")
        self.fc = fc

    def channel_weights(self, activation, grads, ctx):
        if activation.shape[1] != self.fc.in_features:
            raise ValueError(
                f"CAM needs GAP + linear after layer {ctx.layer!r}: it has {activation.shape[1]} channels, "
                f"the head takes {self.fc.in_features}. Use Grad-CAM for other layers.")
        logits = ctx.logits.unsqueeze(1).expand(-1, ctx.mask.shape[1], -1)
        mix = logits.masked_fill(~ctx.mask, float("-inf")).softmax(dim=-1)       # (B, K, N)
        return torch.einsum("bkn,nc->bkc", mix, self.fc.weight)
