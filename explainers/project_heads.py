"""A project's trained heads on its backbone, for inference on photos (:class:`ProjectHeads`).

Built from a :class:`~explainers.training.TrainResult` or a checkpoint dict
(:meth:`ProjectHeads.from_checkpoint`); carries the fusion choice made on validation
(``fusion_weight``, ``fusion`` per label) that :class:`~explainers.segment.Tag2Mask` reads, and the
project's label frequencies (``tag_prior``) and annotated photos (``tag_neighbours``) that weigh an
untagged photo's tag scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from explainers.backbones import Backbone
from explainers.heads import BackboneFeatures, ClassifierHead, SegHead
from explainers.tag_choice import TagPrior
from explainers.tag_neighbours import TagNeighbours

__all__ = ["ProjectHeads"]


class ProjectHeads:
    """A project's trained heads on a backbone, for inference on photos.

    ``tag_probs(photo)`` -> {label: probability} (classifier head); ``seg_probs(photo, labels=None)``
    -> {label: float32 (H, W) probability at the photo's size} (seg head).
    """

    def __init__(self, backbone: Backbone, classifier: ClassifierHead | None, segmenter: SegHead | None,
                 layers: Sequence[str], size: int, fusion_weight: float | None = None,
                 fusion: dict | None = None, tag_prior: TagPrior | None = None, head_cam: str | None = None,
                 tag_neighbours: TagNeighbours | None = None):
        self.backbone = backbone
        self.head_cam = head_cam       # which labels take the classifier head's CAM (None: the engine's config)
        self.tag_prior = tag_prior     # the project's label frequencies (explainers.tag_choice), None: unknown
        self.tag_neighbours = tag_neighbours   # its annotated photos (explainers.tag_neighbours), None: unknown
        self.fusion_weight = None if fusion_weight is None else float(fusion_weight)   # chosen on validation
        # per label, chosen on validation: {label: {"weight", "crf"}} (Tag2Mask.fusion_for); older
        # checkpoints have only fusion_weight
        self.fusion = {str(k): {"weight": float(v["weight"]), "crf": bool(v.get("crf", True))}
                       for k, v in (fusion or {}).items()}
        self.features = BackboneFeatures(backbone, layers)
        self.classifier = classifier.to(backbone.device).eval() if classifier is not None else None
        self.segmenter = segmenter.to(backbone.device).eval() if segmenter is not None else None
        self.size = int(size)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, backbone: Backbone) -> "ProjectHeads":
        if ckpt.get("backbone") != backbone.name:
            raise ValueError(f"heads were trained on {ckpt.get('backbone')!r}, not {backbone.name!r}")

        def unpack(kind):
            part = ckpt.get(kind)
            if not part:
                return None
            head = (ClassifierHead if kind == "classifier" else SegHead).from_spec(part["spec"])
            head.load_state_dict(part["state"])
            return head
        return cls(backbone, unpack("classifier"), unpack("segmenter"), ckpt["layers"], ckpt["size"],
                   ckpt.get("fusion_weight"), ckpt.get("fusion"), TagPrior.from_dict(ckpt.get("tag_prior")),
                   ckpt.get("head_cam"), TagNeighbours.from_dict(ckpt.get("tag_neighbours")))

    @property
    def labels(self) -> list[str]:
        heads = [h for h in (self.classifier, self.segmenter) if h is not None]
        return list(dict.fromkeys(label for h in heads for label in h.labels))

    @torch.no_grad()
    def _features(self, photo: np.ndarray):
        return self.features(self.backbone.to_tensor(photo, self.size))

    @torch.no_grad()
    def tag_probs(self, photo: np.ndarray) -> dict[str, float]:
        if self.classifier is None:
            return {}
        pooled, _ = self._features(photo)
        p = self.classifier.predict_proba(pooled)[0].cpu().numpy()
        return {label: float(p[k]) for k, label in enumerate(self.classifier.labels)}

    @torch.no_grad()
    def seg_probs(self, photo: np.ndarray, labels: Sequence[str] | None = None, flip: bool = True) -> dict[str, np.ndarray]:
        if self.segmenter is None:
            return {}
        h, w = photo.shape[:2]
        x = self.backbone.to_tensor(photo, self.size)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        _, maps = self.features(x)
        p = self.segmenter.predict_proba(maps, size=(h, w))
        p = (p[0] + p[1].flip(-1)) / 2 if flip else p[0]
        p = p.cpu().numpy().astype(np.float32)
        wanted = self.segmenter.labels if labels is None else [l for l in labels if l in self.segmenter.labels]
        return {label: p[self.segmenter.labels.index(label)] for label in wanted}
