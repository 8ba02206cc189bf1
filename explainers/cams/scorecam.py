"""Score-CAM (Wang et al., 2020): channel weights from how much each activation channel, used as
a mask on the input, raises the target scores. No gradients.

For every image each channel of the layer's activation is upsampled to the input size and scaled
to [0, 1]; the input multiplied by it (in the model's normalised space, where 0 is the mean colour)
is classified, and the target scores of the masked inputs, softmaxed over the channels, are the
channel weights. Softmax ignores a constant shift, so this equals using the score increase over a
baseline input. The masked inputs of all images are forwarded together in chunks of `batch_size`
under ``no_grad``, and all K targets of an image come from the same forwards.

`max_channels` (optional) keeps only the channels with the largest mean activation per image
(others get weight 0): much faster, an approximation of the full method.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from explainers.cams.base import BaseCAM
from explainers.cams.targets import target_scores


class ScoreCAM(BaseCAM):
    needs_gradients = False

    def __init__(self, model, target_layers=None, head=None, batch_size: int = 32,
                 max_channels: int | None = None):
        super().__init__(model, target_layers, head)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self.max_channels = max_channels

    @torch.no_grad()
    def channel_weights(self, activation, grads, ctx):
        b_count, c_count = activation.shape[:2]
        k_count = ctx.mask.shape[1]
        if self.max_channels and self.max_channels < c_count:
            chosen = activation.mean(dim=(2, 3)).topk(self.max_channels, dim=1).indices   # (B, M)
        else:
            chosen = torch.arange(c_count, device=activation.device).expand(b_count, -1)
        m_count = chosen.shape[1]
        img_idx = torch.arange(b_count, device=activation.device).repeat_interleave(m_count)
        ch_idx = chosen.reshape(-1)
        size = ctx.x.shape[-2:]
        scores = torch.empty(b_count * m_count, k_count, device=activation.device, dtype=ctx.logits.dtype)
        for start in range(0, img_idx.numel(), self.batch_size):
            bi = img_idx[start:start + self.batch_size]
            ci = ch_idx[start:start + self.batch_size]
            masks = activation[bi, ci].unsqueeze(1)                                          # (n, 1, h, w)
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            flat = masks.flatten(1)
            lo = flat.min(dim=1, keepdim=True).values
            hi = flat.max(dim=1, keepdim=True).values
            masks = ((flat - lo) / (hi - lo).clamp_min(1e-8)).view_as(masks)
            logits = self.model(ctx.x[bi] * masks)
            scores[start:start + bi.numel()] = target_scores(logits, ctx.mask[bi]).to(scores.dtype)
        scores = scores.view(b_count, m_count, k_count)
        weights = torch.zeros(b_count, k_count, c_count, device=activation.device, dtype=activation.dtype)
        soft = scores.softmax(dim=1).permute(0, 2, 1).to(activation.dtype)                      # (B, K, M)
        weights.scatter_(2, chosen.unsqueeze(1).expand(-1, k_count, -1), soft)
        return weights
