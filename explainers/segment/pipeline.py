"""`Tag2Mask`: a photo and its tags -> one mask per tag, with polygons, boxes and scores.

Stages (each a small function or class in this package, chosen by :class:`PipelineConfig`):

1. CAM (:mod:`cam_stage`): all tags' maps from shared multi-scale, flipped forward passes (with
   ``cam.ensemble``, averaged with those of more backbones: :mod:`cam_ensemble`). With
   trained heads, the project's own labels (those ImageNet cannot name, and those the head learnt
   against photos without them; ``fusion.head_cam``) get theirs from its classifier head instead
   (:mod:`head_cam`), so labels ImageNet lacks get masks too.
2. Background (:mod:`background`): background + per-tag probabilities from the CAMs.
2b. Fusion (optional, :mod:`fusion`): with trained heads (``Tag2Mask(heads=...)`` or
   ``set_heads``), the seg head's probabilities are blended into those of the tags it knows, at
   the weight the heads carry for each label (chosen on validation: :meth:`Tag2Mask.fusion_for`).
3. Dense CRF (:mod:`crf`) over background + all tags jointly, at a working resolution (off for
   the labels whose validation chose it off: :func:`~explainers.segment.crf.crf_by_tag`).
4. Clean-up (:mod:`postprocess`) of the per-tag masks at the original resolution.
5. Geometry (:mod:`geometry`): polygons and boxes with scores; each mask's estimated quality (:mod:`quality`).

A tag the engine cannot segment (no classifier class, not a label of the trained heads) does not
sink the photo's other tags: they are segmented, and it is listed in ``PhotoResult.skipped`` with
its reason (:meth:`Tag2Mask.split_tags`). Only a photo none of whose tags can be segmented fails,
with :class:`~explainers.errors.UnknownTagError` giving every tag's reason and :data:`UNUSABLE_HINT`.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from explainers.backbones import Backbone, load_backbone
from explainers.hooks import LayerRecorder
from explainers.segment.background import calibrated, class_probabilities
from explainers.segment.cam_ensemble import CAMEnsemble
from explainers.segment.cam_stage import CAMOutput, CAMStage, pass_size
from explainers.segment.config import PipelineConfig
from explainers.segment.crf import crf_by_tag
from explainers.segment.fusion import fuse_seg
from explainers.segment.geometry import mask_geometry
from explainers.segment.head_cam import HeadCAM, merge_cam_outputs
from explainers.segment.postprocess import clean_masks, label_masks
from explainers.segment.quality import fill_quality
from explainers.segment.types import PhotoResult, TagMask


UNUSABLE_HINT = ("To segment such a tag, give its classifier classes (Tag2Mask(tag_extra=...); predicted_values in "
                 "Label Studio) or train a classifier head on photos with it.")


def _resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float32 -> (C, H, W), bilinear."""
    h, w = size
    if maps.shape[1:] == (h, w):
        return maps
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR) for m in maps])


def check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"expected an RGB photo as a uint8 array (H, W, 3), got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 photo, got dtype {image.dtype}")
    return np.ascontiguousarray(image)


class Tag2Mask:
    """Segment a photo's tags with a pretrained classifier's CAMs and a dense CRF.

    `backbone`: a name for :func:`explainers.load_backbone` (on `device`) or a loaded Backbone.
    `config`: stage settings (default: the "balanced" preset).
    `tag_extra` adds or overrides tag -> class-name lists (see :func:`explainers.tags.resolve_tag`).

    One instance runs one photo at a time (the CAM hooks sit on the shared model during a call):
    give each worker thread its own instance, sharing a Backbone is fine between processes only.
    """

    def __init__(self, backbone: str | Backbone = "efficientnet_lite0", config: PipelineConfig | None = None,
                 device=None, tag_extra: dict[str, list[str]] | None = None, heads=None):
        self.backbone = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, device)
        self.config = config or PipelineConfig.preset("balanced")
        self.tag_extra = tag_extra
        self.cam_stage = CAMStage(self.backbone, self.config.cam)
        self.ensemble = CAMEnsemble(self.backbone, self.config.cam)
        self.ensemble_stages = self.ensemble.stages(self.config.cam.ensemble)   # loaded now, as every photo's
        self.background = calibrated(self.config.background, self.backbone.name)
        self.quality_model = None   # what estimates TagMask.quality; None = explainers/data/quality_score.json
        self.heads = None
        self.set_heads(heads)

    def set_heads(self, heads) -> None:
        """Use a project's trained heads (:class:`explainers.project_heads.ProjectHeads`, or None to stop).

        Their seg head's probabilities are fused with the CAM-derived ones (``config.fusion``) for
        the tags it was trained on; other tags keep the CAM alone. Their classifier head gives the
        CAMs and scores of the tags of :meth:`_head_tags` (by default: labels ImageNet cannot name, and
        labels the head was trained on photos without).
        The heads must sit on this engine's backbone (same name).
        """
        if heads is not None:
            name = getattr(getattr(heads, "backbone", None), "name", None)
            if name != self.backbone.name:
                raise ValueError(f"heads were trained on {name!r}, the engine runs {self.backbone.name!r}")
        self.heads = heads

    # -- tags ---------------------------------------------------------------------------------
    def class_set(self, tag: str) -> tuple[int, ...]:
        """The classifier's class indices of `tag` (raises UnknownTagError)."""
        from explainers.tags import resolve_tag

        return tuple(resolve_tag(tag, self.backbone.categories, self.tag_extra).indices)

    # -- the pipeline ---------------------------------------------------------------------------
    def predict(self, image_rgb: np.ndarray, tags: Sequence[str]) -> PhotoResult:
        """One photo (RGB uint8, EXIF-upright) and its tags -> masks at the photo's size, shapes, scores."""
        return self.predict_with_probs(image_rgb, tags)[0]

    def predict_with_probs(self, image_rgb: np.ndarray, tags: Sequence[str]) -> tuple[PhotoResult, np.ndarray | None]:
        """As :meth:`predict`, plus the CRF's per-pixel class probabilities (K + 1, h, w) float32 at the
        working resolution, background first, tags in the order of the result (None without tags).
        Self-training reads its pseudo-masks and their confidence from these.

        Tags that cannot be segmented are left out and listed in the result's ``skipped``; when no tag
        can be, UnknownTagError (every tag's reason)."""
        image = check_image(image_rgb)
        h, w = image.shape[:2]
        tags, skipped = self._usable_or_raise(tags)
        if not tags:
            return PhotoResult(width=w, height=h, tags=[]), None
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cam = self._cam_output(image, tags)
        timings["cam"] = time.perf_counter() - t0
        result, probs = self._from_cam(image, tags, cam, timings, t0)
        result.skipped = skipped
        return result, probs

    def tag_cams(self, image_rgb: np.ndarray, tags: Sequence[str],
                 ensemble: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 alone: the CAMs of `tags` (K, H, W) float32 in [0, 1] at the photo's size and their
        probabilities (K,), from the project's classifier head or ImageNet's as :meth:`predict` takes
        them. `ensemble`: the backbones (names) whose CAMs are averaged with the engine's for the tags
        ImageNet's classifier names, in this call (each loaded on first use, then kept); None: the
        engine's ``cam.ensemble``. Raises UnknownTagError when a tag cannot be segmented."""
        image = check_image(image_rgb)
        tags = list(tags)
        for tag in tags:
            if not self.can_segment(tag):
                self.class_set(tag)          # raises UnknownTagError with the reason
        cam = self._cam_output(image, tags, None if ensemble is None else self.ensemble.stages(ensemble))
        maps = _resize(cam.maps.float().cpu().numpy(), image.shape[:2])
        return np.clip(maps, 0.0, 1.0), cam.probs.float().cpu().numpy()

    def _usable_or_raise(self, tags: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """:meth:`split_tags`, raising UnknownTagError when tags were given but none can be segmented
        (one tag: its own message; several: all their reasons in one sentence; then :data:`UNUSABLE_HINT`)."""
        from explainers.errors import UnknownTagError

        usable, skipped = self.split_tags(tags)
        if skipped and not usable:
            reasons = "; ".join(skipped.values())
            if len(skipped) > 1:
                reasons = "none of the photo's tags can be segmented: " + reasons
            end = "" if reasons.endswith((".", "?", "!")) else "."
            raise UnknownTagError(f"{reasons}{end} {UNUSABLE_HINT}")
        return usable, skipped

    def unusable_reason(self, tag: str) -> str | None:
        """Why :meth:`predict` cannot give `tag` a mask (the :class:`UnknownTagError` message of its
        lookup, e.g. "tag 'person' has no class in the ImageNet-1k classifier: ..."), or None when it can."""
        from explainers.errors import UnknownTagError

        if self._head_tags([tag]):
            return None
        try:
            self.class_set(tag)
        except UnknownTagError as exc:
            return str(exc) or f"tag {tag!r} maps to no class of the classifier"
        return None

    def split_tags(self, tags: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """(the tags :meth:`predict` can segment, without repeats, in order; {other tag: why not})."""
        usable, skipped = [], {}
        for tag in dict.fromkeys(tags):
            reason = self.unusable_reason(tag)
            if reason is None:
                usable.append(tag)
            else:
                skipped[tag] = reason
        return usable, skipped

    def head_labels(self) -> list[str]:
        """The labels of the project's classifier head ([] without heads or without a classifier)."""
        classifier = getattr(self.heads, "classifier", None)
        return list(classifier.labels) if classifier is not None else []

    def knows_tag(self, tag: str) -> bool:
        """Whether the backbone's classifier can name `tag` (it resolves to ImageNet classes)."""
        from explainers.errors import UnknownTagError

        try:
            self.class_set(tag)
        except UnknownTagError:
            return False
        return True

    def can_segment(self, tag: str) -> bool:
        """Whether :meth:`predict` can give `tag` a mask: the backbone's classifier names it, or it is
        one of :meth:`_head_tags` (a label of the project's classifier head)."""
        return bool(self._head_tags([tag])) or self.knows_tag(tag)

    def _head_tags(self, tags: Sequence[str], mode: str | None = None) -> list[str]:
        """The tags whose CAM and score come from the project's classifier head (:class:`HeadCAM`)
        instead of the backbone's classifier, per ``config.fusion.head_cam`` (none without heads):
        "unknown" = the head's labels the backbone cannot name; "auto" = those and the head's labels
        trained against at least ``fusion.head_min_negatives`` photos without them; "always" = all
        the head's labels; "off" = none. The mode: `mode`, else the config's, where that is "auto" the
        heads' own when they carry one (``heads.head_cam``: a self-trained version keeps ImageNet's
        CAM for the labels it names, "unknown")."""
        fcfg = self.config.fusion
        if mode is None:
            mode = fcfg.head_cam
            if mode == "auto" and getattr(self.heads, "head_cam", None):
                mode = self.heads.head_cam
        if mode not in ("auto", "unknown", "always", "off"):
            raise ValueError(f"unknown fusion.head_cam {mode!r}; choose 'auto', 'unknown', 'always' or 'off'")
        known = set(self.head_labels())
        if mode == "off" or not known:
            return []
        classifier = self.heads.classifier

        def use_head(tag: str) -> bool:
            if mode == "always":
                return True
            if mode == "auto" and classifier.knows_absence(tag, fcfg.head_min_negatives):
                return True
            return not self.knows_tag(tag)
        return [t for t in tags if t in known and use_head(t)]

    def _cam_output(self, image: np.ndarray, tags: Sequence[str], ensemble: list[CAMStage] | None = None):
        """Stage 1 for one photo: the CAM maps and tag probabilities of `tags`, in order
        (:class:`~explainers.segment.cam_stage.CAMOutput`). The tags of :meth:`_head_tags` get theirs
        from the classifier head (:class:`~explainers.segment.head_cam.HeadCAM`, probabilities = the
        head's sigmoid), the others from the backbone's classifier (``self.cam_stage``, averaged with
        the `ensemble` stages; None: the ``cam.ensemble`` ones)."""
        head = set(self._head_tags(tags))
        parts = []
        imagenet = [t for t in tags if t not in head]
        if imagenet:
            parts.append((imagenet, self._imagenet_cams(image, [self.class_set(t) for t in imagenet], ensemble)))
        if head:
            labels = [t for t in tags if t in head]
            parts.append((labels, HeadCAM(self.backbone, self.heads.classifier, self.config.cam)(image, labels)))
        cam = parts[0][1] if len(parts) == 1 else merge_cam_outputs(tags, parts)
        if cam.maps.is_cuda:
            torch.cuda.synchronize()
        return cam

    def _imagenet_cams(self, image: np.ndarray, class_sets: list,
                       ensemble: list[CAMStage] | None = None) -> CAMOutput:
        """The CAM stage of the tags the ImageNet classifier names: the engine's backbone's, averaged
        (maps and tag probabilities) with those of the `ensemble` stages (None: the ``cam.ensemble``
        backbones') when there are any."""
        stages = self.ensemble_stages if ensemble is None else ensemble
        return self.ensemble(self.cam_stage(image, class_sets), image, class_sets, stages)

    def _from_cam(self, image: np.ndarray, tags: Sequence[str], cam, timings: dict[str, float],
                  t0: float) -> tuple[PhotoResult, np.ndarray]:
        """Stages 2-5 for one photo, from its :class:`CAMOutput` (the maps of `tags`, in order)."""
        cfg = self.config
        h, w = image.shape[:2]
        maps = cam.maps
        tag_probs = cam.probs.float().cpu().numpy()

        t = time.perf_counter()
        unary = class_probabilities(maps, self.background, cam.probs)
        timings["background"] = time.perf_counter() - t

        wh, ww = cam.work_size
        t = time.perf_counter()
        seg = self._seg_probs(image, tags, (wh, ww))
        if seg:
            weights = {tag: self.fusion_for(tag)[0] for tag in seg}
            unary = fuse_seg(unary, tags, seg, weights, cfg.fusion.mode, self.background.min_prob)
            timings["fusion"] = time.perf_counter() - t

        t = time.perf_counter()
        small = image if (wh, ww) == (h, w) else cv2.resize(image, (ww, wh), interpolation=cv2.INTER_AREA)
        probs = crf_by_tag(small, unary, [self.fusion_for(tag)[1] for tag in tags], cfg.crf)
        timings["crf"] = time.perf_counter() - t

        t = time.perf_counter()
        full = _resize(probs, (h, w))
        masks = clean_masks(label_masks(full), cfg.postprocess)
        timings["postprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        results = []
        for k, (tag, mask) in enumerate(zip(tags, masks)):
            polygons, boxes = mask_geometry(mask, full[k + 1], float(tag_probs[k]), cfg.geometry)
            results.append(TagMask(tag=tag, mask=mask, score=float(tag_probs[k]), polygons=polygons, boxes=boxes))
        fill_quality(results, maps, probs, tag_probs, self.quality_model)
        timings["geometry"] = time.perf_counter() - t

        cams = {}
        if cfg.keep_cams:
            cams_np = _resize(maps.float().cpu().numpy(), (h, w))
            cams = {tag: np.clip(cams_np[k], 0, 1).astype(np.float32) for k, tag in enumerate(tags)}
        timings["total"] = time.perf_counter() - t0
        return PhotoResult(width=w, height=h, tags=results, cams=cams, timings=timings), probs

    def fusion_weight(self) -> float:
        """The seg head's weight in the fusion: the one chosen on validation when the heads carry it
        (``heads.fusion_weight``), else ``config.fusion.seg_weight``."""
        chosen = getattr(self.heads, "fusion_weight", None)
        return float(chosen) if chosen is not None else float(self.config.fusion.seg_weight)

    def fusion_for(self, tag: str) -> tuple[float, bool]:
        """(seg head weight, dense CRF on) for `tag`: the per-label choice the heads carry
        (``heads.fusion[tag]`` = {"weight", "crf"}, chosen on validation), else :meth:`fusion_weight`
        with the configured CRF. ``config.crf.enabled = False`` switches the CRF off for every tag."""
        crf = bool(self.config.crf.enabled)
        entry = (getattr(self.heads, "fusion", None) or {}).get(tag)
        if entry is None:
            return self.fusion_weight(), crf
        return float(entry["weight"]), crf and bool(entry.get("crf", True))

    def _seg_probs(self, image: np.ndarray, tags: Sequence[str], size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Seg-head probabilities at `size` for the tags the head knows ({} without heads or fusion)."""
        fcfg = self.config.fusion
        if self.heads is None or not fcfg.enabled:
            return {}
        if getattr(self.heads, "segmenter", None) is None:
            return {}
        known = [t for t in tags if t in self.heads.segmenter.labels and self.fusion_for(t)[0] > 0]
        if not known:
            return {}
        seg = self.heads.seg_probs(image, known, flip=fcfg.flip)
        return {t: cv2.resize(p, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for t, p in seg.items()}

    def predict_many(self, images: Sequence[np.ndarray], tags_per_image: Sequence[Sequence[str]],
                     progress: Callable[[int, int], None] | None = None,
                     batch_size: int = 8) -> list[PhotoResult | Exception]:
        """`predict` for each photo; a failing photo gives its Exception at its index, the rest go on.

        The photos go in chunks of `batch_size`: stage 1 (the CAMs) of a chunk's photos runs in shared
        batched passes (:meth:`CAMStage.many`, at most `batch_size` photos a pass), stages 2-5 per
        photo. Photos the batched stage cannot take (tags of the project's classifier head, no tag
        that can be segmented, not a photo), and all of a chunk whose batched stage fails, go through
        :meth:`predict` one by one. A photo's tags that cannot be segmented are left out of its result
        and listed in its ``skipped``, as :meth:`predict` does. The results equal :meth:`predict`'s up
        to float noise. `progress(done, total)` is called after each photo.
        """
        if len(images) != len(tags_per_image):
            raise ValueError(f"{len(images)} photos but {len(tags_per_image)} tag lists")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        total = len(images)
        out: list[PhotoResult | Exception] = []
        for start in range(0, total, batch_size):
            chunk = range(start, min(total, start + batch_size))
            batched, cam_seconds = self._batched_cams([images[i] for i in chunk],
                                                      [tags_per_image[i] for i in chunk], batch_size)
            for j, i in enumerate(chunk):
                out.append(self._predict_one(images[i], tags_per_image[i], batched.get(j), cam_seconds))
                if progress is not None:
                    progress(i + 1, total)
        return out

    def _batchable(self, image_rgb: np.ndarray, tags: Sequence[str]
                   ) -> tuple[np.ndarray, list[str], list, dict[str, str]] | None:
        """(checked photo, the tags to segment, their class sets, {tag left out: why}) when the batched
        CAM stage can take the photo: some tag that can be segmented, all of those named by the
        backbone's classifier, none for the classifier head. None otherwise (also when the photo is
        bad or no tag can be segmented: :meth:`predict` then reports why)."""
        try:
            image = check_image(image_rgb)
            tags, skipped = self.split_tags(tags)
            if not tags or self._head_tags(tags) or self.ensemble_stages:
                return None
            return image, tags, [self.class_set(t) for t in tags], skipped
        except Exception:  # noqa: BLE001 - the photo goes one by one, where its error is reported
            return None

    def _batched_cams(self, images: Sequence[np.ndarray], tags_per_image: Sequence[Sequence[str]],
                      max_batch: int) -> tuple[dict[int, tuple[np.ndarray, list[str], object, dict]], float]:
        """Stage 1 of the :meth:`_batchable` photos of a chunk in batched passes -> ({position in the
        chunk: (photo, tags, CAMOutput, {tag left out: why})}, CAM seconds per photo). Empty when none
        is batchable or the batched stage fails (then all go one by one)."""
        ready = {}
        for j, (img, tags) in enumerate(zip(images, tags_per_image)):
            prepared = self._batchable(img, tags)
            if prepared is not None:
                ready[j] = prepared
        if not ready:
            return {}, 0.0
        t0 = time.perf_counter()
        try:
            cams = self.cam_stage.many([p[0] for p in ready.values()], [p[2] for p in ready.values()], max_batch)
            if cams[0].maps.is_cuda:
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - e.g. out of device memory: the one-by-one path still works
            warnings.warn(f"batched CAM pass of {len(ready)} photos failed ({type(exc).__name__}: {exc}); "
                          "they go one by one (lower batch_size if the device ran out of memory)",
                          RuntimeWarning, stacklevel=3)
            return {}, 0.0
        seconds = (time.perf_counter() - t0) / len(ready)
        return {j: (p[0], p[1], cam, p[3]) for (j, p), cam in zip(ready.items(), cams)}, seconds

    def _predict_one(self, image_rgb: np.ndarray, tags: Sequence[str], batched: tuple | None,
                     cam_seconds: float) -> PhotoResult | Exception:
        """One photo's result, or its Exception: stages 2-5 from its batched CAMs (`batched` = (photo,
        tags, CAMOutput, {tag left out: why}), their time `cam_seconds` counted in its timings), else
        :meth:`predict`."""
        try:
            if batched is None:
                return self.predict(image_rgb, tags)
            image, tags, cam, skipped = batched
            result = self._from_cam(image, tags, cam, {"cam": cam_seconds}, time.perf_counter() - cam_seconds)[0]
            result.skipped = dict(skipped)
            return result
        except Exception as exc:  # noqa: BLE001 - recorded per photo, by design
            return exc

    # -- classifier only ------------------------------------------------------------------------
    def _probs(self, image_rgb: np.ndarray) -> torch.Tensor:
        image = check_image(image_rgb)
        h, w = image.shape[:2]
        x = self.backbone.to_tensor(image, pass_size(h, w, 1.0, self.config.cam))
        return self.backbone.predict(x)[0]

    def tag_scores(self, image_rgb: np.ndarray, tags: Sequence[str], head_mode: str | None = None) -> dict[str, float]:
        """Each tag's probability on this photo, from one forward pass at the CAM stage's scale-1 size.

        The tags of :meth:`_head_tags` get the project's classifier head's sigmoid probability (the
        score their masks get too); the others the probability mass of their ImageNet class set.
        With the default ``fusion.head_cam = "auto"`` the head scores the labels ImageNet cannot name
        and those it was trained against photos without them, because a head learns that a label is
        absent only from such photos: a project whose examples all carry the label (every photo
        tagged "horse") trains a head that says yes to anything (12 horse-only photos: "horse" 0.99
        on skimage's cat), whereas ImageNet's softmax never degenerates so; there ImageNet keeps
        the label. ``"always"`` scores every label the head knows with the head.
        """
        return self._scores_and_feature(image_rgb, tags, head_mode, False)[0]

    def _scores_and_feature(self, image_rgb: np.ndarray, tags: Sequence[str], head_mode: str | None,
                            want_feature: bool) -> tuple[dict[str, float], torch.Tensor | None]:
        """(:meth:`tag_scores`, the photo's pooled feature at the heads' layer when the heads' layer
        was recorded: for the head's labels, or when `want_feature`; else None)."""
        image = check_image(image_rgb)
        h, w = image.shape[:2]
        head = set(self._head_tags(tags, head_mode))
        x = self.backbone.to_tensor(image, pass_size(h, w, 1.0, self.config.cam))
        layer = self.backbone.target_layers[0]
        record = bool(head) or want_feature
        with LayerRecorder(self.backbone.model, [layer] if record else []) as rec:
            p = self.backbone.predict(x)[0]
        scores, pooled = {}, None
        if record:
            pooled = rec[layer].float().mean(dim=(2, 3))
        if head:
            classifier = self.heads.classifier
            probs = classifier.predict_proba(pooled)[0]
            scores = {t: float(probs[classifier.labels.index(t)]) for t in head}
        scores = {tag: scores[tag] if tag in head else float(p[list(self.class_set(tag))].sum()) for tag in tags}
        return scores, pooled

    def choice_scores(self, image_rgb: np.ndarray, tags: Sequence[str]) -> dict[str, float]:
        """The scores that choose an untagged photo's tags: :meth:`tag_scores`, where the project's heads
        carry its label frequencies (``heads.tag_prior``, :class:`explainers.tag_choice.TagPrior`), those
        of the tags the classifier head does not score moved by the label's prior log-odds (the head's
        own scores hold the frequency already), then, where the heads keep the annotated photos
        (``heads.tag_neighbours``, :class:`explainers.tag_neighbours.TagNeighbours`), moved half-way to
        the labels of the nearest annotated photo when the photo is near one. Without heads: :meth:`tag_scores`."""
        mode = self.config.fusion.head_cam     # the head scores what it learnt, whatever its CAM serves
        prior = getattr(self.heads, "tag_prior", None)
        neighbours = getattr(self.heads, "tag_neighbours", None)
        scores, pooled = self._scores_and_feature(image_rgb, tags, mode, neighbours is not None)
        head = set(self._head_tags(tags, mode))
        if prior is not None:
            scores = {t: s if t in head else prior.adjust(t, s) for t, s in scores.items()}
        if neighbours is not None and pooled is not None:
            scores = neighbours.blend(scores, pooled[0], [t for t in scores if t not in head])
        return scores

    def classify(self, image_rgb: np.ndarray, top_k: int = 5) -> list[tuple[str, float]]:
        """The classifier's own top tags: class probabilities summed per tag (tag_for_class), best first."""
        from explainers.tags import tag_for_class

        p = self._probs(image_rgb).float().cpu()
        order = torch.argsort(p, descending=True).tolist()
        scores: dict[str, float] = {}
        for idx in order[: max(50, top_k * 10)]:
            tag = tag_for_class(idx) or self.backbone.categories[idx]
            scores[tag] = scores.get(tag, 0.0) + float(p[idx])
        return sorted(scores.items(), key=lambda kv: -kv[1])[:top_k]
