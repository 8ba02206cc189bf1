"""Training the heads of :mod:`explainers.heads` on a project's examples, on a frozen backbone.

This module holds the whole job (:func:`train_heads`, :func:`refit_heads`) and its outcome
(:class:`TrainResult`, with its checkpoint). The parts it runs live in their own modules and their
public names are re-exported here, the library's training API: :class:`Sample` and
:func:`split_samples` (:mod:`explainers.samples`), :class:`TrainConfig` (:mod:`explainers.train_config`),
:class:`FeatureCache` (:mod:`explainers.feature_cache`), the seg head's targets
(:mod:`explainers.seg_targets`), :func:`train_classifier` and :func:`train_segmenter`
(:mod:`explainers.head_training`), the validation scores (:mod:`explainers.train_metrics`) and
:class:`ProjectHeads` (:mod:`explainers.project_heads`).

Pure library (no Label Studio): an example is a :class:`Sample` (a photo or a loader, its tags, its
masks and boxes per label, in pixels of the photo). ``train_heads`` does the whole job:

1. split the samples into train / validation by a seeded hash of each sample's key (a sample keeps
   its side as the set grows; at least ``min_val`` go to validation when there are enough);
2. compute the backbone features once per photo (and its mirror image) with a :class:`FeatureCache`
   that keeps them on the device, so epochs only run the heads;
3. train the :class:`~explainers.heads.ClassifierHead` on the tags (BCE, full batch) and, when
   some samples have masks or boxes, the :class:`~explainers.heads.SegHead` (weighted BCE + soft
   Dice; a mask supervises every pixel; a box-only label supervises outside=0 fully and inside the
   box, with ``box_mode="grabcut"`` (default), GrabCut's pseudo-mask at a lower weight
   (:mod:`explainers.box_masks`, run when the photo is loaded for its features), with
   ``box_mode="box"`` the filled box at ``box_weight``; a label absent from a photo's tags is a
   negative everywhere);
4. score the validation samples: mAP and F1@0.5 over tags, foreground IoU over masks.

How the parts combine in the pipeline (the seg head's fusion weight, the CRF on/off, per label) is
chosen afterwards on the validation masks (:func:`explainers.segment.fusion_tuning.choose_fusion`;
stored in ``fusion`` and ``fusion_weight``). Then :func:`refit_heads` trains the heads once more on
every example, the validation ones included, so no correction is left out of the served model
(``TrainConfig.refit``: "continue" the validated seg head for ``refit_epochs`` on all of them, the
default; "scratch"; "off"). The validation scores stay those of the heads trained on the train part.

CPU by default when no CUDA device is present (the backbone's device is used). Deterministic for a
given seed on the CPU; on CUDA, bilinear upsampling's backward uses atomics, so runs may differ in
the last bits.

    result = train_heads(backbone, samples, labels=["pony-photo", "kitchen"], config=TrainConfig(seed=0))
    result.validation        # {"map": .., "f1": .., "fg_iou": .., "n_val": .., "n_val_masks": ..}
    ckpt = result.checkpoint()   # plain dict of tensors/str/numbers -> torch.save / registry
    heads = ProjectHeads.from_checkpoint(ckpt, backbone)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from explainers.backbones import Backbone
from explainers.device import pick_device
from explainers.feature_cache import FeatureCache
from explainers.head_training import tag_matrix, train_classifier, train_segmenter
from explainers.heads import BackboneFeatures, ClassifierHead, SegHead
from explainers.project_heads import ProjectHeads
from explainers.samples import Sample, split_samples
from explainers.seg_targets import PseudoMasks, seg_targets
from explainers.tag_choice import TagPrior, count_labels
from explainers.tag_neighbours import TagNeighbours
from explainers.train_config import TrainConfig
from explainers.train_metrics import average_precision, fg_iou_scores, tag_metrics

__all__ = [
    "Sample", "TrainConfig", "TrainResult", "FeatureCache", "ProjectHeads", "split_samples", "train_heads",
    "refit_heads", "train_classifier", "train_segmenter", "average_precision", "tag_metrics", "fg_iou_scores",
]


@dataclass
class TrainResult:
    """What :func:`train_heads` (and :func:`refit_heads`) produced: the heads, their validation
    scores, counts and timings, the split, and the fusion chosen afterwards on validation."""

    labels: list[str]
    classifier: ClassifierHead | None
    segmenter: SegHead | None
    validation: dict
    counts: dict
    seconds: dict
    backbone: str
    layers: list[str]
    size: int
    config: dict
    train_keys: list[str] = field(default_factory=list)
    val_keys: list[str] = field(default_factory=list)
    fusion_weight: float | None = None   # the seg head's fusion weight chosen on validation (None: the default)
    fusion: dict = field(default_factory=dict)   # label -> {"weight", "crf"} chosen on validation per label
    refit_keys: list[str] = field(default_factory=list)   # the examples the served heads were refit on
    tag_prior: TagPrior | None = None    # how often each label was annotated, over every example (tag choice)
    head_cam: str | None = None          # which labels take the classifier head's CAM when served (None: the config's)
    tag_neighbours: TagNeighbours | None = None   # the annotated photos' features and labels (tag choice)

    def checkpoint(self) -> dict:
        """Everything a worker needs, as plain types + tensors (``torch.load(weights_only=True)``-safe);
        ``"fusion_weight"`` and ``"fusion"`` (per label) only when chosen
        (:mod:`explainers.segment.fusion_tuning`); ``"tag_prior"``: the label counts of
        :class:`explainers.tag_choice.TagPrior`; ``"tag_neighbours"``: the annotated photos of
        :class:`explainers.tag_neighbours.TagNeighbours`."""
        def pack(head):
            if head is None:
                return None
            return {"spec": head.spec(), "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
        ckpt = {"format": 1, "backbone": self.backbone, "layers": list(self.layers), "size": int(self.size),
                "labels": list(self.labels), "classifier": pack(self.classifier), "segmenter": pack(self.segmenter)}
        if self.fusion_weight is not None:
            ckpt["fusion_weight"] = float(self.fusion_weight)
        if self.tag_prior is not None:
            ckpt["tag_prior"] = self.tag_prior.to_dict()
        if self.head_cam is not None:
            ckpt["head_cam"] = str(self.head_cam)
        if self.tag_neighbours is not None:
            ckpt["tag_neighbours"] = self.tag_neighbours.to_dict()
        if self.fusion:
            ckpt["fusion"] = {str(label): {"weight": float(c["weight"]), "crf": bool(c.get("crf", True))}
                              for label, c in self.fusion.items()}
        return ckpt


def _validate(heads: ProjectHeads, entries: Sequence[dict], val: Sequence[Sample], labels: Sequence[str],
              cfg: TrainConfig) -> dict:
    out: dict = {"n_val": len(val)}
    if not val:
        return out
    if heads.classifier is not None:
        pooled = torch.stack([e["pooled"][0] for e in entries])
        probs = heads.classifier.predict_proba(pooled).cpu().numpy()
        out.update(tag_metrics(probs, tag_matrix(val, labels).numpy(), cfg.threshold))
    pairs = []
    if heads.segmenter is not None:
        for entry, s in zip(entries, val):
            if not s.masks:
                continue
            shape = np.asarray(next(iter(s.masks.values()))).shape[:2]
            maps = [m[:1] for m in entry["maps"]]
            p = heads.segmenter.predict_proba(maps, size=shape)[0].cpu().numpy()
            if entry["pooled"].shape[0] == 2:       # average with the mirror image's prediction
                maps_f = [m[1:2] for m in entry["maps"]]
                p = (p + heads.segmenter.predict_proba(maps_f, size=shape)[0].flip(-1).cpu().numpy()) / 2
            for label, mask in s.masks.items():
                if label in heads.segmenter.labels:
                    pairs.append((label, p[heads.segmenter.labels.index(label)] >= cfg.threshold, mask))
    out["n_val_masks"] = len(pairs)
    if pairs:
        scores = fg_iou_scores(pairs)
        out["fg_iou"] = scores["fg_iou"]
        out["fg_iou_per_label"] = scores["per_label"]
    return out


def train_heads(backbone: Backbone, samples: Sequence[Sample], labels: Sequence[str] | None = None,
                config: TrainConfig | None = None, cache: FeatureCache | None = None,
                train_classifier_head: bool = True, train_seg_head: bool = True,
                validation: Sequence[Sample] | None = None, init_segmenter: SegHead | None = None,
                pseudo_targets: dict | None = None) -> TrainResult:
    """Split, extract features (cached), train both heads, validate. See the module docstring.

    `labels` fixes the label order (default: every tag/region label seen, sorted). `validation`
    gives an explicit validation set instead of the hash split. The seg head is trained only when
    at least one training sample has a mask or a box. Samples whose photo cannot be loaded are left
    out and listed in ``counts["skipped"]`` ({key: reason}); ValueError when no training photo loads.
    `init_segmenter`: train the seg head on from a copy of this one (:func:`refit_heads`).
    `pseudo_targets`: {sample key: (target, weight) (K, out, out) in `labels` order} for samples
    without masks or boxes (self-training, :func:`explainers.self_training.pseudo_training_targets`):
    those samples train the seg head on them too; a sample's own masks and boxes always win.
    """
    cfg = config or TrainConfig()
    if not samples:
        raise ValueError("no training samples")
    if labels is None:
        labels = sorted({t for s in samples for t in s.all_tags()} | {t for s in (validation or []) for t in s.all_tags()})
    labels = list(labels)
    if not labels:
        raise ValueError("the samples carry no tags, masks or boxes: nothing to learn")
    if validation is None:
        train, val = split_samples(samples, cfg.val_fraction, cfg.seed, cfg.min_val)
    else:
        train, val = list(samples), list(validation)
    if cfg.device is not None and pick_device(cfg.device) != backbone.device:
        raise ValueError(f"config.device {cfg.device} differs from the backbone's device {backbone.device}")
    features = cache.features if cache is not None else BackboneFeatures(backbone)
    cache = cache or FeatureCache(features, cfg.size, cfg.flip, cfg.extract_batch)
    if cache.size != cfg.size or cache.flip != cfg.flip:
        raise ValueError("the feature cache was built with another size/flip than the config")

    if cfg.box_mode not in ("grabcut", "box"):
        raise ValueError(f"unknown box_mode {cfg.box_mode!r}; choose 'grabcut' or 'box'")
    out = cfg.size // cfg.target_stride
    pseudo = PseudoMasks(train if train_seg_head else [], out, cfg)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train_entries = cache.get(train, skip_failed=True, on_photo=pseudo.on_photo)
    val_entries = cache.get(val, skip_failed=True)
    skipped = {str(s.key): cache.failed.get(s.cache_key, "not loaded")
               for s, e in zip([*train, *val], [*train_entries, *val_entries]) if e is None}
    train, train_entries = [s for s, e in zip(train, train_entries) if e is not None], [e for e in train_entries if e is not None]
    val, val_entries = [s for s, e in zip(val, val_entries) if e is not None], [e for e in val_entries if e is not None]
    if not train:
        raise ValueError(f"no training photo could be loaded: {skipped}")
    seconds["features"] = time.perf_counter() - t0 - pseudo.seconds

    classifier = None
    if train_classifier_head:
        t = time.perf_counter()
        pooled = torch.cat([e["pooled"] for e in train_entries])
        views = train_entries[0]["pooled"].shape[0]
        y = tag_matrix(train, labels).repeat_interleave(views, dim=0)
        classifier = train_classifier(pooled, y, labels, cfg)
        classifier.negatives = [int(n) for n in (1 - tag_matrix(train, labels)).sum(0).tolist()]  # photos without each label
        seconds["classifier"] = time.perf_counter() - t

    segmenter = None
    from_pseudo = pseudo_targets or {}
    seg_train = [(e, s) for e, s in zip(train_entries, train) if s.has_regions or str(s.key) in from_pseudo]
    if train_seg_head and seg_train:
        pseudo.complete(train)
        if pseudo.by_key:
            seconds["box_masks"] = pseudo.seconds
        t = time.perf_counter()

        def targets_of(s):
            if not s.has_regions and str(s.key) in from_pseudo:
                return from_pseudo[str(s.key)]
            return seg_targets(s, labels, out, cfg, pseudo.get(s))
        pairs = [(e, targets_of(s)) for e, s in zip(train_entries, train)]
        pairs = [(e, tw) for e, tw in pairs if tw is not None]
        segmenter = train_segmenter([e for e, _ in pairs], [tw for _, tw in pairs], labels, features.channels, cfg,
                                    init=init_segmenter)
        seconds["segmenter"] = time.perf_counter() - t

    heads = ProjectHeads(backbone, classifier, segmenter, features.layers, cfg.size)
    t = time.perf_counter()
    scores = _validate(heads, val_entries, val, labels, cfg)
    seconds["validation"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    counts = {
        "examples": len(samples) + (len(validation) if validation is not None else 0),
        "train": len(train), "val": len(val),
        "train_with_masks": sum(1 for s in train if s.masks),
        "train_with_boxes": sum(1 for s in train if s.boxes and not s.masks),
        "train_tags_only": sum(1 for s in train if not s.has_regions),
        "train_pseudo_masks": sum(1 for s in train if not s.has_regions and str(s.key) in from_pseudo),
        "positives": {label: int(v) for label, v in zip(labels, tag_matrix(train, labels).sum(0).tolist())},
        "skipped": skipped,
    }
    every = [*samples, *(validation or [])]
    neighbours = TagNeighbours.build(torch.stack([e["pooled"][0] for e in [*train_entries, *val_entries]]),
                                     [s.all_tags() for s in [*train, *val]])     # view 0: the photo unflipped
    return TrainResult(labels=labels, classifier=classifier, segmenter=segmenter, validation=scores, counts=counts,
                       seconds=seconds, backbone=backbone.name, layers=list(features.layers), size=cfg.size,
                       config=asdict(cfg), train_keys=[str(s.key) for s in train], val_keys=[str(s.key) for s in val],
                       tag_prior=count_labels([s.all_tags() for s in every]), tag_neighbours=neighbours)


def refit_heads(backbone: Backbone, result: TrainResult, samples: Sequence[Sample], config: TrainConfig | None = None,
                cache: FeatureCache | None = None, pseudo_targets: dict | None = None) -> TrainResult:
    """The heads of `result` trained once more on every example it used, validation ones included.

    After the validation split has chosen how the parts combine (``result.fusion``), nothing is left
    to hold out for: ``config.refit`` (default: ``result.config``'s) "continue" trains a copy of the
    validated seg head ``refit_epochs`` more epochs on all the examples at peak learning rate
    ``refit_lr``, and the classifier head anew on all of them (it takes a fraction of a second);
    "scratch" trains both anew on all, as :func:`train_heads` did; "off" (or no validation example)
    returns `result` itself. `cache`: the one `result` was trained with (its features are reused);
    `pseudo_targets`: those `result` was trained with (self-training).

    The returned result keeps `result`'s validation scores, fusion choice, train/validation keys
    and counts (those heads were validated on what), with ``counts["refit"]`` (examples refit on),
    ``counts["refit_mode"]``, ``seconds["refit"]`` and ``refit_keys`` added.
    """
    cfg = config or TrainConfig(**result.config)
    if cfg.refit not in ("continue", "scratch", "off"):
        raise ValueError(f"unknown refit {cfg.refit!r}; choose 'continue', 'scratch' or 'off'")
    if cfg.refit == "off" or not result.val_keys:
        return result
    used = set(result.train_keys) | set(result.val_keys)
    every = [s for s in samples if str(s.key) in used]
    t = time.perf_counter()
    kwargs = dict(labels=result.labels, cache=cache, validation=[], train_classifier_head=result.classifier is not None,
                  train_seg_head=result.segmenter is not None, pseudo_targets=pseudo_targets)
    if cfg.refit == "continue" and result.segmenter is not None:
        new = train_heads(backbone, every, config=replace(cfg, seg_epochs=max(1, cfg.refit_epochs), seg_lr=cfg.refit_lr),
                          init_segmenter=result.segmenter, **kwargs)
    else:
        new = train_heads(backbone, every, config=cfg, **kwargs)
    seconds = dict(result.seconds)
    seconds["refit"] = time.perf_counter() - t
    seconds["total"] = seconds.get("total", 0.0) + seconds["refit"]
    counts = {**result.counts, "refit": new.counts["train"], "refit_mode": cfg.refit}
    if new.counts.get("skipped"):
        counts["skipped"] = {**result.counts.get("skipped", {}), **new.counts["skipped"]}
    return replace(result, classifier=new.classifier, segmenter=new.segmenter, counts=counts, seconds=seconds,
                   refit_keys=list(new.train_keys))
