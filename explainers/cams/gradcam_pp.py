"""Grad-CAM++ (Chattopadhay et al., 2018): channel weights from 2nd/3rd-order gradient terms.

With the exponential of the target score as the explained output, the higher-order derivatives
are powers of the first-order gradient ``g`` of the score, which gives the closed form

    alpha_kc(i,j) = g^2 / (2 g^2 + sum_ab A_c(a,b) * g^3)
    w_kc          = sum_ij alpha_kc(i,j) * ReLU(g(i,j))

``alpha`` is set to 0 where ``g`` is 0 (the 0/0 case). A class set's score is its log-sum-exp,
so the same formula applies unchanged.
"""
from __future__ import annotations

import torch

from explainers.cams.base import BaseCAM


class GradCAMPlusPlus(BaseCAM):
    eps = 1e-7

    def channel_weights(self, activation, grads, ctx):
        g2 = grads.pow(2)
        g3 = g2 * grads
        act_sum = activation.sum(dim=(2, 3))[:, None, :, None, None]           # (B, 1, C, 1, 1)
        denom = 2 * g2 + act_sum * g3
        denom = torch.where(denom != 0, denom, torch.full_like(denom, self.eps))
        alpha = torch.where(grads != 0, g2 / denom, torch.zeros_like(g2))
        return (alpha * grads.clamp_min(0)).sum(dim=(3, 4))
