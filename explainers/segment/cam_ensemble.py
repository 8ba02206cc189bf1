"""CAMs of several backbones averaged: the engine's ``cam.ensemble`` (every prediction) and the
ensembles asked for in one call (a smart tool's box: ``Tag2Mask.tag_cams(..., ensemble=names)``).

    ensemble = CAMEnsemble(backbone, config.cam)
    default = ensemble.stages(config.cam.ensemble)     # what the engine loads at start
    out = ensemble(cam_stage(image, class_sets), image, class_sets, ensemble.stages(("efficientnet_lite1",)))

Each backbone is loaded once, on first use, and kept; the engine's own backbone in a list is left
out (its CAMs are already the first of the average).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from explainers.backbones import load_backbone
from explainers.segment.cam_stage import CAMOutput, CAMStage
from explainers.segment.config import CAMConfig

__all__ = ["CAMEnsemble"]


class CAMEnsemble:
    def __init__(self, backbone, config: CAMConfig):
        self.backbone = backbone
        self.config = config
        self._loaded: dict[str, CAMStage] = {}

    @property
    def loaded(self) -> tuple[str, ...]:
        """The names of the extra backbones loaded so far."""
        return tuple(self._loaded)

    def stages(self, names: Sequence[str]) -> list[CAMStage]:
        """The CAM stages of the backbones `names` (loaded on first use; the engine's own left out)."""
        for name in names:
            if name not in self._loaded and name != self.backbone.name:
                self._loaded[name] = CAMStage(load_backbone(name, self.backbone.device), self.config)
        return [self._loaded[name] for name in names if name != self.backbone.name]

    def __call__(self, out: CAMOutput, image, class_sets: list, stages: list[CAMStage]) -> CAMOutput:
        """`out` (the engine's backbone's CAMs of `class_sets` on `image`) averaged, maps and tag
        probabilities, with those of `stages`; `out` itself when there are none."""
        if not stages:
            return out
        outs = [out] + [stage(image, class_sets) for stage in stages]
        device = out.maps.device
        return CAMOutput(maps=torch.stack([o.maps.to(device) for o in outs]).mean(0),
                         probs=torch.stack([o.probs.to(device) for o in outs]).mean(0), work_size=out.work_size)
