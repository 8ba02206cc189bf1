"""Stage 1 for a project's own labels: class activation maps from its trained classifier head.

A :class:`~explainers.heads.ClassifierHead` computes ``logits = W (pooled - mean) / std + b``, where
``pooled`` is the spatial mean of the backbone's GAP layer (``backbone.target_layers[0]``, see
:class:`~explainers.heads.BackboneFeatures`). That is exactly the case of the original CAM: the logit
of label k is the spatial mean of

    M_k(x, y) = sum_c W[k, c] / std[c] * A_c(x, y)

plus a constant ``b_k - sum_c W[k, c] mean[c] / std[c]``. So a label ImageNet never had
("pony-photo") gets a map from the same features the ImageNet CAM reads, with no gradient pass.
A head trained with its calibrating penalty (``TrainConfig.clf_l2``) carries a second, unpenalised
set of directions (``ClassifierHead.cam_weight``): the maps use those, the probabilities the
calibrated weights (:func:`explainers.head_training.train_classifier` says why).

:class:`HeadCAM` makes those maps with the passes of the CAM stage
(:func:`~explainers.segment.cam_stage.multi_scale`: the same pass sizes, scales and flip, ReLU at the
layer's resolution, bilinear to the working size, per-pass peak normalisation, average) and its post-steps (``propagate`` over the affinity layer's features of the
walk's pass (``affinity_pass``), then ``guard_cover``), and returns a :class:`~explainers.segment.cam_stage.CAMOutput`
whose ``probs`` are the head's sigmoid probabilities (mean over the passes and mirror images).
Everything stays on the backbone's device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from explainers.backbones import Backbone
from explainers.errors import UnknownTagError
from explainers.heads import ClassifierHead
from explainers.hooks import LayerRecorder, get_layer
from explainers.segment.cam_stage import CAMOutput, multi_scale
from explainers.segment.config import CAMConfig

__all__ = ["HeadCAM", "merge_cam_outputs"]


class HeadCAM:
    """Callable: (photo RGB uint8, labels of `classifier`) -> :class:`CAMOutput`.

    `classifier` must read the pooled `backbone.target_layers[0]` (as every head trained by
    :func:`explainers.training.train_heads` does). `cfg` gives the passes and post-steps, as for
    :class:`~explainers.segment.cam_stage.CAMStage`.
    """

    def __init__(self, backbone: Backbone, classifier: ClassifierHead, cfg: CAMConfig):
        if not cfg.scales:
            raise ValueError("CAMConfig.scales is empty")
        self.backbone = backbone
        self.classifier = classifier
        self.cfg = cfg
        self.layer = backbone.target_layers[0]
        self.affinity_layer = (cfg.affinity_layer or backbone.fusion_layers[-1]) if cfg.affinity else None
        for name in (self.layer, self.affinity_layer):
            if name:
                get_layer(backbone.model, name)   # a wrong name fails here, listing the valid ones

    def weights(self, labels: Sequence[str], maps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, C) channel weights ``W / std`` and (K,) constants ``b - W mean / std`` of `labels`: the
        probabilities' weights, or with `maps` the maps' directions (``ClassifierHead.map_weight``)."""
        index = []
        for label in labels:
            if label not in self.classifier.labels:
                raise UnknownTagError(f"the project's classifier head does not know {label!r} "
                                      f"(it knows {', '.join(self.classifier.labels)})")
            index.append(self.classifier.labels.index(label))
        clf = self.classifier
        w = (clf.map_weight() if maps else clf.linear.weight).detach().float()[index] / clf.std.float()
        const = clf.linear.bias.detach().float()[index] - w @ clf.mean.float()
        return w, const

    @torch.no_grad()
    def layer_maps(self, x: torch.Tensor, labels: Sequence[str],
                   record: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass of the batch `x`: the raw maps M_k (B, K, h, w) at the GAP layer's
        resolution (before any ReLU; from the maps' directions, :meth:`weights` with ``maps``; with one
        set of weights their spatial mean is the head's logit minus the constant), the head's logits
        (B, K), and the outputs of the extra layers `record`."""
        w, const = self.weights(labels)
        w_maps = self.weights(labels, maps=True)[0]
        names = list(dict.fromkeys([self.layer, *record]))
        with LayerRecorder(self.backbone.model, names) as rec:
            self.backbone.model(x)
        acts = rec[self.layer].detach().float()
        if acts.shape[1] != w.shape[1]:
            raise ValueError(f"the classifier head takes {w.shape[1]} features, layer {self.layer!r} has "
                             f"{acts.shape[1]} channels: it was trained on another backbone")
        logits = acts.mean(dim=(2, 3)) @ w.T + const
        maps = torch.einsum("kc,bchw->bkhw", w_maps, acts)
        return maps, logits, {name: rec[name].detach() for name in record}

    @torch.no_grad()
    def __call__(self, image: np.ndarray, labels: Sequence[str]) -> CAMOutput:
        def one_pass(x: torch.Tensor, work: tuple[int, int], record: bool):
            raw, logits, rec = self.layer_maps(x, labels, [self.affinity_layer] if record else [])
            # features of the walk's pass (unflipped photo), as the CAM stage takes them
            features = rec[self.affinity_layer][:1] if record else None
            maps = F.interpolate(F.relu(raw), size=work, mode="bilinear", align_corners=False)
            return maps, logits.sigmoid().mean(0), features

        return multi_scale(self.backbone, image, self.cfg, bool(self.affinity_layer), one_pass)


def merge_cam_outputs(tags: Sequence[str], parts: Sequence[tuple[Sequence[str], CAMOutput]]) -> CAMOutput:
    """One :class:`CAMOutput` for `tags`, in order, from outputs of disjoint subsets of them
    (``(their tags, output)`` pairs of the same photo, hence the same working size)."""
    sizes = {tuple(out.work_size) for _, out in parts}
    if len(sizes) != 1:
        raise ValueError(f"CAM outputs of different working sizes: {sorted(sizes)}")
    where = {t: (i, k) for i, (names, _) in enumerate(parts) for k, t in enumerate(names)}
    missing = [t for t in tags if t not in where]
    if missing:
        raise ValueError(f"no CAM output has the tags {missing}")
    maps = torch.stack([parts[where[t][0]][1].maps[where[t][1]] for t in tags])
    probs = torch.stack([parts[where[t][0]][1].probs[where[t][1]].float() for t in tags])
    return CAMOutput(maps=maps, probs=probs, work_size=parts[0][1].work_size)
