"""`Tag2Mask`: a photo and its tags -> one mask per tag, with polygons, boxes and scores.

Stages (each a small function or class in this package, chosen by :class:`PipelineConfig`):

1. CAM (:mod:`cam_stage`): all tags' maps from shared multi-scale, flipped forward passes.
2. Background (:mod:`background`): background + per-tag probabilities from the CAMs.
2b. Fusion (optional, :func:`fuse_seg`): with trained heads (``Tag2Mask(heads=...)`` or
   ``set_heads``), the seg head's probabilities are blended into those of the tags it knows.
3. Dense CRF (:mod:`crf`) over background + all tags jointly, at a working resolution.
4. Clean-up (:mod:`postprocess`) of the per-tag masks at the original resolution.
5. Geometry (:mod:`geometry`): polygons and boxes with scores.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from explainers.backbones import Backbone, load_backbone
from explainers.segment.background import calibrated, class_probabilities
from explainers.segment.cam_stage import CAMStage
from explainers.segment.config import PipelineConfig
from explainers.segment.crf import dense_crf
from explainers.segment.geometry import mask_geometry
from explainers.segment.postprocess import clean_masks, label_masks
from explainers.segment.types import PhotoResult, TagMask


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


def fuse_seg(unary: np.ndarray, tags: Sequence[str], seg: dict[str, np.ndarray], weight: float,
             mode: str = "linear", min_prob: float = 1e-3) -> np.ndarray:
    """Blend seg-head probabilities into the CAM-derived class probabilities.

    `unary` (K + 1, h, w): background first, then `tags` in order, summing to 1 per pixel. `seg`:
    tag -> (h, w) foreground probability of the seg head; tags missing from it keep the CAM alone.
    The seg head's distribution over the classes: the known tags together get
    M = 1 - prod(1 - p_k), shared in proportion to their p_k; the background and the other tags
    share 1 - M in the proportions the CAM gave them. It is mixed with the CAM's, ``linear``
    = (1 - w) cam + w seg or ``log`` = cam^(1-w) seg^w, and renormalised.
    """
    if mode not in ("linear", "log"):
        raise ValueError(f"unknown fusion mode {mode!r}; choose 'linear' or 'log'")
    w = float(np.clip(weight, 0.0, 1.0))
    known = [k + 1 for k, t in enumerate(tags) if t in seg]
    if not known:
        return unary
    rest = [c for c in range(unary.shape[0]) if c not in known]
    p = np.stack([np.clip(seg[tags[c - 1]], 0.0, 1.0).astype(np.float32) for c in known])
    mass = 1.0 - np.prod(1.0 - p, axis=0)
    head = np.empty_like(unary, dtype=np.float32)
    head[known] = mass * p / np.maximum(p.sum(axis=0), 1e-8)
    cam_rest = unary[rest]
    head[rest] = (1.0 - mass) * cam_rest / np.maximum(cam_rest.sum(axis=0), 1e-8)
    head = np.maximum(head, min_prob)
    head /= head.sum(axis=0, keepdims=True)
    if mode == "linear":
        out = (1.0 - w) * unary + w * head
    else:
        out = np.exp((1.0 - w) * np.log(np.maximum(unary, min_prob)) + w * np.log(head))
    out = np.maximum(out, min_prob)
    return (out / out.sum(axis=0, keepdims=True)).astype(np.float32)


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
        self.background = calibrated(self.config.background, self.backbone.name)
        self.heads = None
        self.set_heads(heads)

    def set_heads(self, heads) -> None:
        """Use a project's trained heads (:class:`explainers.training.ProjectHeads`, or None to stop).

        Their seg head's probabilities are fused with the CAM-derived ones (``config.fusion``) for
        the tags it was trained on; other tags keep the CAM alone. The heads must sit on this
        engine's backbone (same name).
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
        Self-training reads its pseudo-masks and their confidence from these."""
        image = check_image(image_rgb)
        tags = list(dict.fromkeys(tags))  # drop repeats, keep order
        h, w = image.shape[:2]
        if not tags:
            return PhotoResult(width=w, height=h, tags=[]), None
        cfg = self.config
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cam = self._cam_output(image, tags)
        timings["cam"] = time.perf_counter() - t0
        return self._from_cam(image, tags, cam, timings, t0)

    def _head_tags(self, tags: Sequence[str]) -> list[str]:
        """The tags whose CAM comes from the project's classifier head instead of the backbone's
        classifier (none without heads)."""
        return []

    def _cam_output(self, image: np.ndarray, tags: Sequence[str]):
        """Stage 1 for one photo: the CAM maps and tag probabilities of `tags`, in order
        (:class:`~explainers.segment.cam_stage.CAMOutput`)."""
        cam = self.cam_stage(image, [self.class_set(t) for t in tags])
        if cam.maps.is_cuda:
            torch.cuda.synchronize()
        return cam

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
            unary = fuse_seg(unary, tags, seg, self.fusion_weight(), cfg.fusion.mode, self.background.min_prob)
            timings["fusion"] = time.perf_counter() - t

        t = time.perf_counter()
        small = image if (wh, ww) == (h, w) else cv2.resize(image, (ww, wh), interpolation=cv2.INTER_AREA)
        probs = dense_crf(small, unary, cfg.crf)
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

    def _seg_probs(self, image: np.ndarray, tags: Sequence[str], size: tuple[int, int]) -> dict[str, np.ndarray]:
        """Seg-head probabilities at `size` for the tags the head knows ({} without heads or fusion)."""
        fcfg = self.config.fusion
        if self.heads is None or not fcfg.enabled or self.fusion_weight() <= 0:
            return {}
        if getattr(self.heads, "segmenter", None) is None:
            return {}
        known = [t for t in tags if t in self.heads.segmenter.labels]
        if not known:
            return {}
        seg = self.heads.seg_probs(image, known, flip=fcfg.flip)
        return {t: cv2.resize(p, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for t, p in seg.items()}

    def predict_many(self, images: Sequence[np.ndarray], tags_per_image: Sequence[Sequence[str]],
                     progress: Callable[[int, int], None] | None = None) -> list[PhotoResult | Exception]:
        """`predict` for each photo; a failing photo gives its Exception at its index, the rest go on.

        `progress(done, total)` is called after each photo.
        """
        if len(images) != len(tags_per_image):
            raise ValueError(f"{len(images)} photos but {len(tags_per_image)} tag lists")
        out: list[PhotoResult | Exception] = []
        for i, (img, tags) in enumerate(zip(images, tags_per_image)):
            try:
                out.append(self.predict(img, tags))
            except Exception as exc:  # noqa: BLE001 - recorded per photo, by design
                out.append(exc)
            if progress is not None:
                progress(i + 1, len(images))
        return out

    # -- classifier only ------------------------------------------------------------------------
    def _probs(self, image_rgb: np.ndarray) -> torch.Tensor:
        image = check_image(image_rgb)
        h, w = image.shape[:2]
        from explainers.segment.cam_stage import pass_size

        x = self.backbone.to_tensor(image, pass_size(h, w, 1.0, self.config.cam))
        return self.backbone.predict(x)[0]

    def tag_scores(self, image_rgb: np.ndarray, tags: Sequence[str]) -> dict[str, float]:
        """Probability mass of each tag's class set (one forward pass)."""
        p = self._probs(image_rgb)
        return {tag: float(p[list(self.class_set(tag))].sum()) for tag in tags}

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
