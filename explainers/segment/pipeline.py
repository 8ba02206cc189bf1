"""`Tag2Mask`: a photo and its tags -> one mask per tag, with polygons, boxes and scores.

Stages (each a small function or class in this package, chosen by :class:`PipelineConfig`):

1. CAM (:mod:`cam_stage`): all tags' maps from shared multi-scale, flipped forward passes.
2. Background (:mod:`background`): background + per-tag probabilities from the CAMs.
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


class Tag2Mask:
    """Segment a photo's tags with a pretrained classifier's CAMs and a dense CRF.

    `backbone`: a name for :func:`explainers.load_backbone` (on `device`) or a loaded Backbone.
    `config`: stage settings (default: the "balanced" preset).
    `tag_extra` adds or overrides tag -> class-name lists (see :func:`explainers.tags.resolve_tag`).

    One instance runs one photo at a time (the CAM hooks sit on the shared model during a call):
    give each worker thread its own instance, sharing a Backbone is fine between processes only.
    """

    def __init__(self, backbone: str | Backbone = "efficientnet_lite0", config: PipelineConfig | None = None,
                 device=None, tag_extra: dict[str, list[str]] | None = None):
        self.backbone = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, device)
        self.config = config or PipelineConfig.preset("balanced")
        self.tag_extra = tag_extra
        self.cam_stage = CAMStage(self.backbone, self.config.cam)
        self.background = calibrated(self.config.background, self.backbone.name)

    # -- tags ---------------------------------------------------------------------------------
    def class_set(self, tag: str) -> tuple[int, ...]:
        """The classifier's class indices of `tag` (raises UnknownTagError)."""
        from explainers.tags import resolve_tag

        return tuple(resolve_tag(tag, self.backbone.categories, self.tag_extra).indices)

    # -- the pipeline ---------------------------------------------------------------------------
    def predict(self, image_rgb: np.ndarray, tags: Sequence[str]) -> PhotoResult:
        """One photo (RGB uint8, EXIF-upright) and its tags -> masks at the photo's size, shapes, scores."""
        image = check_image(image_rgb)
        tags = list(dict.fromkeys(tags))  # drop repeats, keep order
        h, w = image.shape[:2]
        if not tags:
            return PhotoResult(width=w, height=h, tags=[])
        cfg = self.config
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        sets = [self.class_set(t) for t in tags]
        timings["tags"] = time.perf_counter() - t0

        t = time.perf_counter()
        cam = self.cam_stage(image, sets)
        maps = cam.maps
        tag_probs = cam.probs.float().cpu().numpy()
        if maps.is_cuda:
            torch.cuda.synchronize()
        timings["cam"] = time.perf_counter() - t

        t = time.perf_counter()
        unary = class_probabilities(maps, self.background, cam.probs)
        timings["background"] = time.perf_counter() - t

        t = time.perf_counter()
        wh, ww = cam.work_size
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
        return PhotoResult(width=w, height=h, tags=results, cams=cams, timings=timings)

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
