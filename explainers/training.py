"""Training the heads of :mod:`explainers.heads` on a project's examples, on a frozen backbone.

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

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from explainers.backbones import Backbone
from explainers.box_masks import fill_boxes
from explainers.device import pick_device
from explainers.heads import BackboneFeatures, ClassifierHead, SegHead

__all__ = [
    "Sample", "TrainConfig", "TrainResult", "FeatureCache", "ProjectHeads", "split_samples", "train_heads",
    "refit_heads", "train_classifier", "train_segmenter", "average_precision", "tag_metrics", "fg_iou_scores",
]

BoxPx = tuple[float, float, float, float]


@dataclass
class Sample:
    """One training example: a photo (array or loader), its tags, masks and boxes per label.

    ``key`` identifies the example (e.g. the annotation id) and decides its train/validation side;
    ``photo_key`` identifies the photo for the feature cache (default: ``key``). Masks are bool
    (H, W) at the photo's size; boxes are (x0, y0, x1, y1) pixels, x1/y1 exclusive.
    """

    key: str
    tags: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, list[BoxPx]] = field(default_factory=dict)
    image: np.ndarray | None = None
    load: Callable[[], np.ndarray] | None = None
    photo_key: str | None = None
    shape: tuple[int, int] | None = None     # (height, width) of the photo when known without loading it

    def photo(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        if self.load is None:
            raise ValueError(f"sample {self.key!r} has neither an image nor a loader")
        return self.load()

    @property
    def cache_key(self) -> str:
        return str(self.photo_key if self.photo_key is not None else self.key)

    def all_tags(self) -> list[str]:
        """Tags plus the labels that have a mask or a box (a region implies its tag)."""
        return list(dict.fromkeys([*self.tags, *self.masks, *self.boxes]))

    @property
    def has_regions(self) -> bool:
        return any(np.asarray(m).any() for m in self.masks.values()) or any(self.boxes.values())


@dataclass
class TrainConfig:
    size: int = 256                 # photos are resized to size x size for the backbone
    flip: bool = True               # also train on the mirror image (features cached for both)
    val_fraction: float = 0.2
    min_val: int = 1                # at least this many validation samples when there are >= 2 * min_val
    seed: int = 0
    device: str | None = None       # None: CUDA when present, else CPU (the backbone's device wins)
    extract_batch: int = 8
    # classifier head
    clf_epochs: int = 300           # full-batch steps
    clf_lr: float = 0.05
    clf_weight_decay: float = 1e-2
    # segmentation head
    seg_epochs: int = 40
    seg_lr: float = 3e-3
    seg_weight_decay: float = 1e-4
    seg_batch: int = 8
    seg_hidden: int = 64
    target_stride: int = 4          # loss computed at size / target_stride
    box_mode: str = "grabcut"       # box-only labels: "grabcut" pseudo-masks (explainers.box_masks) or "box" filled
    box_weight: float = 0.3         # weight of the inside-box pixels (target 1) of a filled box
    grabcut_weight: float = 0.6     # weight of the inside-box pixels of a GrabCut pseudo-mask (outside: 1)
    grabcut_band: float = 0.02      # ignored band along GrabCut's outline, x the box's short side
    grabcut_side: int = 256         # GrabCut's working resolution (long side, px)
    dice_weight: float = 0.5
    negatives_from_tags: bool = True  # a label missing from a photo's tags is background everywhere
    threshold: float = 0.5          # probability cut for F1 and masks
    # after validation (refit_heads): train once more on every example, validation ones included
    refit: str = "continue"         # "continue": the validated seg head, refit_epochs more on all; "scratch"; "off"
    refit_epochs: int = 10          # "continue": epochs on all examples
    refit_lr: float = 1e-3          # "continue": the seg head's peak learning rate


@dataclass
class TrainResult:
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

    def checkpoint(self) -> dict:
        """Everything a worker needs, as plain types + tensors (``torch.load(weights_only=True)``-safe);
        ``"fusion_weight"`` and ``"fusion"`` (per label) only when chosen
        (:mod:`explainers.segment.fusion_tuning`)."""
        def pack(head):
            if head is None:
                return None
            return {"spec": head.spec(), "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}}
        ckpt = {"format": 1, "backbone": self.backbone, "layers": list(self.layers), "size": int(self.size),
                "labels": list(self.labels), "classifier": pack(self.classifier), "segmenter": pack(self.segmenter)}
        if self.fusion_weight is not None:
            ckpt["fusion_weight"] = float(self.fusion_weight)
        if self.fusion:
            ckpt["fusion"] = {str(label): {"weight": float(c["weight"]), "crf": bool(c.get("crf", True))}
                              for label, c in self.fusion.items()}
        return ckpt


# -- splitting ---------------------------------------------------------------------------------------
def _hash01(seed: int, key: str) -> float:
    digest = hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_samples(samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0,
                  min_val: int = 1) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) by a seeded hash of each key: stable as samples are added or removed."""
    ranked = sorted(samples, key=lambda s: (_hash01(seed, str(s.key)), str(s.key)))
    n_val = sum(1 for s in ranked if _hash01(seed, str(s.key)) < val_fraction)
    if len(ranked) >= 2 * min_val:
        n_val = max(n_val, min_val)
    n_val = min(n_val, max(0, len(ranked) - 1))
    val = ranked[:n_val]
    val_keys = {id(s) for s in val}
    return [s for s in samples if id(s) not in val_keys], [s for s in samples if id(s) in val_keys]


# -- features ----------------------------------------------------------------------------------------
class FeatureCache:
    """Backbone features per photo, computed once and kept on the device.

    ``entry = cache.get(samples)[i]``: ``{"pooled": (V, C), "maps": [(V, C_l, h_l, w_l)]}`` where V is
    1 (the photo) or 2 (photo, mirror image) with ``flip``. Keyed by ``sample.cache_key``.
    """

    def __init__(self, features: BackboneFeatures, size: int = 256, flip: bool = True, batch_size: int = 8):
        self.features = features
        self.size = int(size)
        self.flip = bool(flip)
        self.batch_size = max(1, int(batch_size))
        self._store: dict[str, dict] = {}
        self.computed = 0          # photos run through the backbone so far
        self.failed: dict[str, str] = {}   # photo key -> why it could not be loaded (skip_failed)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def forget(self, key: str) -> None:
        self._store.pop(key, None)

    def get(self, samples: Sequence[Sample], skip_failed: bool = False,
            on_photo: Callable[[str, np.ndarray], None] | None = None) -> list[dict | None]:
        """Entries in the order of `samples`. A photo that cannot be loaded raises, or with
        `skip_failed` gives None (its reason is kept in ``self.failed[key]``). `on_photo(key, photo)`
        is called for each photo loaded here (those not cached yet), so other per-photo work (box
        pseudo-masks) needs no second load."""
        missing = list(dict.fromkeys(s.cache_key for s in samples if s.cache_key not in self._store))
        by_key = {s.cache_key: s for s in samples}
        for i in range(0, len(missing), self.batch_size):      # photos are loaded one batch at a time
            photos: dict[str, np.ndarray] = {}
            for k in missing[i:i + self.batch_size]:
                try:
                    photos[k] = by_key[k].photo()
                except Exception as exc:  # noqa: BLE001 - reported per photo
                    if not skip_failed:
                        raise
                    self.failed[k] = f"{type(exc).__name__}: {exc}"
                    continue
                if on_photo is not None:
                    on_photo(k, photos[k])
            if photos:
                self._extract(photos)
        return [self._store.get(s.cache_key) if skip_failed else self._store[s.cache_key] for s in samples]

    def _extract(self, photos: dict[str, np.ndarray]) -> None:
        """Run one batch of photos (key -> RGB) through the backbone (and their mirror images)."""
        keys = list(photos)
        x = self.features.backbone.to_tensor([photos[k] for k in keys], self.size)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        pooled, maps = self.features(x)
        n = len(keys)
        for j, k in enumerate(keys):
            idx = [j, n + j] if self.flip else [j]
            self._store[k] = {"pooled": pooled[idx].contiguous(), "maps": [m[idx].contiguous() for m in maps]}
        self.computed += n


# -- metrics -----------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one label: mean precision at the rank of each positive (NaN without positives)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets).astype(bool)
    if not targets.any():
        return math.nan
    order = np.argsort(-scores, kind="stable")
    hits = targets[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def tag_metrics(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict:
    """mAP over labels that have a positive, micro F1 at `threshold`, accuracy of the decisions."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets).astype(bool)
    aps = [average_precision(probs[:, k], targets[:, k]) for k in range(targets.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    pred = probs >= threshold
    tp, fp, fn = int((pred & targets).sum()), int((pred & ~targets).sum()), int((~pred & targets).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    return {"map": float(np.mean(aps)) if aps else math.nan, "f1": float(f1),
            "accuracy": float((pred == targets).mean()) if targets.size else math.nan}


def fg_iou_scores(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """(label, predicted bool mask, true bool mask) triples -> pooled fg IoU per label and their mean."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for label, pred, gt in pairs:
        pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
        inter[label] = inter.get(label, 0) + int((pred & gt).sum())
        union[label] = union.get(label, 0) + int((pred | gt).sum())
    per = {label: (inter[label] / union[label] if union[label] else 1.0) for label in inter}
    return {"fg_iou": float(np.mean(list(per.values()))) if per else math.nan, "per_label": per}


# -- classifier --------------------------------------------------------------------------------------
def _tag_matrix(samples: Sequence[Sample], labels: Sequence[str]) -> torch.Tensor:
    index = {label: k for k, label in enumerate(labels)}
    y = torch.zeros(len(samples), len(labels))
    for i, s in enumerate(samples):
        for t in s.all_tags():
            if t in index:
                y[i, index[t]] = 1.0
    return y


def train_classifier(pooled: torch.Tensor, targets: torch.Tensor, labels: Sequence[str],
                     config: TrainConfig | None = None) -> ClassifierHead:
    """Logistic regression per label on standardised pooled features (full batch, AdamW, BCE with
    per-label positive weighting so rare labels are not drowned)."""
    cfg = config or TrainConfig()
    dev = pooled.device
    head = ClassifierHead(pooled.shape[1], labels).to(dev)
    head.set_normalization(pooled)
    y = targets.to(dev).float()
    pos = y.sum(0)
    pos_weight = ((len(y) - pos) / pos.clamp_min(1.0)).clamp(1.0, 10.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.clf_lr, weight_decay=cfg.clf_weight_decay)
        head.train()
        for _ in range(cfg.clf_epochs):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(head(pooled), y, pos_weight=pos_weight)
            loss.backward()
            opt.step()
    return head.eval()


# -- segmentation ------------------------------------------------------------------------------------
Targets = tuple[np.ndarray, np.ndarray]     # (target, weight) float32 arrays of the same shape


def _seg_targets(sample: Sample, labels: Sequence[str], out: int, cfg: TrainConfig,
                 pseudo: dict[str, Targets] | None = None) -> Targets | None:
    """(target, weight) float32 (K, out, out) for the square-resized photo; None if nothing supervises.

    A mask supervises every pixel; a box-only label uses its entry in `pseudo` (label -> (target,
    weight) at (out, out), from :func:`_box_pseudo_targets`) when there is one, else the filled box
    (outside 0 at weight 1, inside 1 at ``box_weight``); a label missing from the tags is background.
    """
    k_n = len(labels)
    target = np.zeros((k_n, out, out), np.float32)
    weight = np.zeros((k_n, out, out), np.float32)
    tags = set(sample.all_tags())
    pseudo = pseudo or {}
    shape = sample.shape
    for m in sample.masks.values():
        shape = np.asarray(m).shape[:2]
        break
    for k, label in enumerate(labels):
        mask = sample.masks.get(label)
        boxes = sample.boxes.get(label) or []
        if mask is not None:
            m = np.asarray(mask, np.float32)
            target[k] = cv2.resize(m, (out, out), interpolation=cv2.INTER_AREA)
            weight[k] = 1.0
        elif boxes and label in pseudo:
            target[k], weight[k] = pseudo[label]
        elif boxes:
            if shape is None:
                shape = sample.photo().shape[:2]
            inside = fill_boxes(boxes, shape, (out, out))
            target[k] = inside
            weight[k] = np.where(inside, cfg.box_weight, 1.0)
        elif label not in tags and cfg.negatives_from_tags:
            weight[k] = 1.0
    if not weight.any():
        return None
    return target, weight


def _needs_pseudo_masks(sample: Sample, cfg: TrainConfig) -> bool:
    """Whether `sample` has a box-only label that ``box_mode="grabcut"`` turns into a pseudo-mask."""
    return cfg.box_mode == "grabcut" and any(b and label not in sample.masks for label, b in sample.boxes.items())


def _box_pseudo_targets(sample: Sample, photo: np.ndarray, out: int, cfg: TrainConfig) -> dict[str, Targets]:
    """label -> (target, weight) float32 (out, out) of each box-only label of `sample`: GrabCut
    pseudo-masks of the square-resized photo (:func:`explainers.box_masks.box_pseudo_mask`)."""
    from explainers.box_masks import box_pseudo_mask

    found = {}
    for label, boxes in sample.boxes.items():
        if not boxes or label in sample.masks:
            continue
        mask, weight = box_pseudo_mask(photo, boxes, (out, out), work_side=cfg.grabcut_side,
                                       inside_weight=cfg.grabcut_weight, band=cfg.grabcut_band,
                                       fallback_weight=cfg.box_weight, seed=cfg.seed)
        found[label] = (mask.astype(np.float32), weight.astype(np.float32))
    return found


class _PseudoMasks:
    """GrabCut pseudo-targets of the training samples that need them, computed when the feature
    cache loads their photos (``on_photo``) or, for photos whose features were cached earlier,
    by loading them once more (:meth:`complete`)."""

    def __init__(self, samples: Sequence[Sample], out: int, cfg: TrainConfig):
        self.out, self.cfg = out, cfg
        self.by_key: dict[str, list[Sample]] = {}
        for s in samples:
            if _needs_pseudo_masks(s, cfg):
                self.by_key.setdefault(s.cache_key, []).append(s)
        self.targets: dict[int, dict[str, Targets]] = {}     # id(sample) -> label -> (target, weight)
        self.seconds = 0.0

    def on_photo(self, key: str, photo: np.ndarray) -> None:
        t = time.perf_counter()
        for s in self.by_key.get(key, []):
            self.targets[id(s)] = _box_pseudo_targets(s, photo, self.out, self.cfg)
        self.seconds += time.perf_counter() - t

    def complete(self, samples: Sequence[Sample]) -> None:
        """Pseudo-targets of `samples` not done yet (their photo is loaded again; one that fails
        to load keeps the filled boxes)."""
        for s in samples:
            if id(s) in self.targets or s.cache_key not in self.by_key:
                continue
            try:
                photo = s.photo()
            except Exception:  # noqa: BLE001 - its features loaded earlier; the filled box still supervises
                continue
            t = time.perf_counter()
            self.targets[id(s)] = _box_pseudo_targets(s, photo, self.out, self.cfg)
            self.seconds += time.perf_counter() - t

    def get(self, sample: Sample) -> dict[str, Targets] | None:
        return self.targets.get(id(sample))


def _seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, dice_weight: float) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp_min(1.0)
    if dice_weight <= 0:
        return bce
    p = logits.sigmoid() * weight
    t = target * weight
    inter = (p * t).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + t.sum(dim=(2, 3))
    has = t.sum(dim=(2, 3)) > 0          # Dice only where there is foreground to find
    if not has.any():
        return bce
    dice = 1.0 - (2 * inter + 1.0) / (denom + 1.0)
    return bce + dice_weight * dice[has].mean()


def train_segmenter(entries: Sequence[dict], targets: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[str],
                    in_channels: Sequence[int], config: TrainConfig | None = None, device=None,
                    init: SegHead | None = None) -> SegHead:
    """Train a SegHead on cached feature entries and (target, weight) pairs (same order); from
    scratch, or on from a copy of `init` (a head of the same labels; `init` is not changed)."""
    cfg = config or TrainConfig()
    dev = torch.device(device) if device is not None else entries[0]["pooled"].device
    views = []       # (maps per level (C, h, w), target (K, o, o), weight)
    for entry, (t, w) in zip(entries, targets):
        tt, ww = torch.from_numpy(t), torch.from_numpy(w)
        for v in range(entry["pooled"].shape[0]):
            flip = v == 1
            views.append(([m[v] for m in entry["maps"]], tt.flip(-1) if flip else tt, ww.flip(-1) if flip else ww))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if init is not None:
            if list(init.labels) != list(labels):
                raise ValueError(f"the seg head to continue knows {list(init.labels)}, not {list(labels)}")
            head = copy.deepcopy(init).to(dev)
        else:
            head = SegHead(in_channels, labels, hidden=cfg.seg_hidden).to(dev)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.seg_lr, weight_decay=cfg.seg_weight_decay)
        steps = cfg.seg_epochs * max(1, math.ceil(len(views) / cfg.seg_batch))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.seg_lr, total_steps=max(1, steps), pct_start=0.15)
        head.train()
        for _ in range(cfg.seg_epochs):
            order = torch.randperm(len(views), generator=gen).tolist()
            for b in range(0, len(order), cfg.seg_batch):
                batch = [views[i] for i in order[b:b + cfg.seg_batch]]
                maps = [torch.stack([v[0][lvl] for v in batch]) for lvl in range(len(in_channels))]
                target = torch.stack([v[1] for v in batch]).to(dev)
                weight = torch.stack([v[2] for v in batch]).to(dev)
                logits = head(maps, size=tuple(target.shape[-2:]))
                loss = _seg_loss(logits, target, weight, cfg.dice_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return head.eval()


# -- inference bundle --------------------------------------------------------------------------------
class ProjectHeads:
    """A project's trained heads on a backbone, for inference on photos.

    ``tag_probs(photo)`` -> {label: probability} (classifier head); ``seg_probs(photo, labels=None)``
    -> {label: float32 (H, W) probability at the photo's size} (seg head).
    """

    def __init__(self, backbone: Backbone, classifier: ClassifierHead | None, segmenter: SegHead | None,
                 layers: Sequence[str], size: int, fusion_weight: float | None = None,
                 fusion: dict | None = None):
        self.backbone = backbone
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
                   ckpt.get("fusion_weight"), ckpt.get("fusion"))

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


# -- the whole job -----------------------------------------------------------------------------------
def _validate(heads: ProjectHeads, entries: Sequence[dict], val: Sequence[Sample], labels: Sequence[str],
              cfg: TrainConfig) -> dict:
    out: dict = {"n_val": len(val)}
    if not val:
        return out
    if heads.classifier is not None:
        pooled = torch.stack([e["pooled"][0] for e in entries])
        probs = heads.classifier.predict_proba(pooled).cpu().numpy()
        out.update(tag_metrics(probs, _tag_matrix(val, labels).numpy(), cfg.threshold))
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
                validation: Sequence[Sample] | None = None, init_segmenter: SegHead | None = None) -> TrainResult:
    """Split, extract features (cached), train both heads, validate. See the module docstring.

    `labels` fixes the label order (default: every tag/region label seen, sorted). `validation`
    gives an explicit validation set instead of the hash split. The seg head is trained only when
    at least one training sample has a mask or a box. Samples whose photo cannot be loaded are left
    out and listed in ``counts["skipped"]`` ({key: reason}); ValueError when no training photo loads.
    `init_segmenter`: train the seg head on from a copy of this one (:func:`refit_heads`).
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
    pseudo = _PseudoMasks(train if train_seg_head else [], out, cfg)

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
        y = _tag_matrix(train, labels).repeat_interleave(views, dim=0)
        classifier = train_classifier(pooled, y, labels, cfg)
        classifier.negatives = [int(n) for n in (1 - _tag_matrix(train, labels)).sum(0).tolist()]  # photos without each label
        seconds["classifier"] = time.perf_counter() - t

    segmenter = None
    seg_train = [(e, s) for e, s in zip(train_entries, train) if s.has_regions]
    if train_seg_head and seg_train:
        pseudo.complete(train)
        if pseudo.by_key:
            seconds["box_masks"] = pseudo.seconds
        t = time.perf_counter()
        pairs = [(e, _seg_targets(s, labels, out, cfg, pseudo.get(s))) for e, s in zip(train_entries, train)]
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
        "positives": {label: int(v) for label, v in zip(labels, _tag_matrix(train, labels).sum(0).tolist())},
        "skipped": skipped,
    }
    return TrainResult(labels=labels, classifier=classifier, segmenter=segmenter, validation=scores, counts=counts,
                       seconds=seconds, backbone=backbone.name, layers=list(features.layers), size=cfg.size,
                       config=asdict(cfg), train_keys=[str(s.key) for s in train], val_keys=[str(s.key) for s in val])


def refit_heads(backbone: Backbone, result: TrainResult, samples: Sequence[Sample], config: TrainConfig | None = None,
                cache: FeatureCache | None = None) -> TrainResult:
    """The heads of `result` trained once more on every example it used, validation ones included.

    After the validation split has chosen how the parts combine (``result.fusion``), nothing is left
    to hold out for: ``config.refit`` (default: ``result.config``'s) "continue" trains a copy of the
    validated seg head ``refit_epochs`` more epochs on all the examples at peak learning rate
    ``refit_lr``, and the classifier head anew on all of them (it takes a fraction of a second);
    "scratch" trains both anew on all, as :func:`train_heads` did; "off" (or no validation example)
    returns `result` itself. `cache`: the one `result` was trained with (its features are reused).

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
                  train_seg_head=result.segmenter is not None)
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
