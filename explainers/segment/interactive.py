"""Interactive masks: the object an annotator points at with a box or clicks, for Label Studio's smart tools.

A prompt is a box and/or clicks (positive: "this is the object", negative: "this is not") in the
photo's pixels. :class:`PromptSegmenter` turns a photo, a prompt and, optionally, a tag into one mask:

1. **Clicks on a tag with class evidence** become a box: the engine segments the tag on the whole
   photo, and the part of its mask that a positive click hits, grown by ``click_grow``, is the box
   (the clicks stay as sure foreground). Clicks on a tag without (or hitting nothing) are worked out
   in a window around them (``click_window`` x the photo's short side) by GrabCut.
2. **A box, with class evidence** (a tag the engine can segment): the tag's CAM over the box grown by
   ``margin`` (the object then fills the CAM pass; the engine's backbone and the ``cam_ensemble``
   ones averaged), calibrated on that crop (a pixel is the tag's where the CAM is above the crop's
   Otsu threshold: :func:`cam_foreground`), is averaged (``cam_weight``) with the box's features'
   foreground (3., with ``features_with_cam``), and the dense CRF (``feature_crf``) cuts the average.
   That is the answer when the mask's bounding box fits the drawn box (IoU >= ``prior_fit``: an
   annotator's box holds the whole object, tightly) and, if ``prior_min_prob`` is set, the
   classifier sees the tag in the box with at least that probability.
3. **A box otherwise** (no class evidence, or a mask that misses the box): the box's features
   (:mod:`explainers.segment.box_features`, with ``features_alone``): what inside the box is unlike
   the context around it in the CNN's features, its outline snapped to the photo's edges by the same
   CRF. Without a backbone, GrabCut's colour models (sure background outside the box). A box over the
   whole photo leaves no context to learn the background from: the CAM's foreground through the CRF then.
4. **Colour touch-up** of a box's mask (:func:`colour_touch_up`): GrabCut seeded by the mask re-cuts
   it, and the re-cut is kept when it agrees with the mask (IoU >= ``colour_agree``); then a
   morphological close (a disc of ``close_radius`` px) fills the outline's notches and pinholes.
5. **Clean-up.** Components that hold a positive click are kept; without clicks, components smaller
   than ``min_component`` x the largest are dropped. A negative click then removes its region: the
   part of the mask that GrabCut, seeded at that click, takes for one object.

Chosen on the dev objects (horse train split, coco128_dev, MSRC-v2 dev) with
benchmarks/interactive_masks.py; the figures and the rules tried are in the README's smart-tools section.

    seg = PromptSegmenter(engine)                       # an explainers.segment.Tag2Mask, or None
    tm = seg(photo, Prompt(box=(x0, y0, x1, y1)), tag="horse")      # TagMask: mask, polygons, boxes
    tm = seg(photo, Prompt(positive=[(x, y)], negative=[(x2, y2)]), tag="person")

``tag=None`` (or a tag the engine cannot segment) uses the geometry alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from explainers.metrics import box_iou, mask_to_box
from explainers.segment.box_features import FeatureConfig
from explainers.segment.config import CRFConfig, GeometryConfig
from explainers.segment.geometry import mask_geometry
from explainers.segment.postprocess import close_gaps, remove_islands
from explainers.segment.types import TagMask

__all__ = ["Prompt", "PromptConfig", "PromptSegmenter", "cam_foreground", "colour_touch_up", "prompt_mask"]

Point = tuple[float, float]


@dataclass(frozen=True)
class Prompt:
    """A box (x0, y0, x1, y1; pixels, x1/y1 exclusive) and/or clicks (x, y) in the photo's pixels."""

    box: tuple[float, float, float, float] | None = None
    positive: tuple[Point, ...] = ()
    negative: tuple[Point, ...] = ()
    tight: bool = True           # the box was drawn around the whole object (False: derived from clicks)

    def __post_init__(self):
        object.__setattr__(self, "positive", tuple(tuple(map(float, p)) for p in self.positive))
        object.__setattr__(self, "negative", tuple(tuple(map(float, p)) for p in self.negative))
        if self.box is not None:
            object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        if self.box is None and not self.positive:
            raise ValueError("a prompt needs a box or at least one positive click")


@dataclass
class PromptConfig:
    margin: float = 0.1          # context around a box, x its side (GrabCut learns the background there)
    click_window: float = 0.5    # without a box: window around the clicks, x the photo's short side
    work_side: int = 320         # long side of the crop while GrabCut runs
    iterations: int = 4          # GrabCut iterations
    prior: bool = True           # use the engine's class evidence of the tag (its CAM or its pipeline's probability)
    prior_low: float = 0.2       # prior below this: probable background inside the box
    click_radius: float = 0.015  # sure-foreground/background disc at a click, x the crop's long side
    min_component: float = 0.1   # without clicks: drop components under this x the largest
    refine: str = "auto"         # "auto": the tag's CAM and the box's features together when that mask's box fits
    #                              the drawn one (``prior_fit``), else the features (explainers.segment.box_features);
    #                              "prior": the pipeline's probability cut at 0.5 in the box; "features",
    #                              "grabcut": that one alone (GrabCut: with the pipeline's probability as prior)
    cam_weight: float = 0.5      # "auto": the CAM's share in its average with the features' foreground
    cam_ensemble: tuple[str, ...] = ("efficientnet_lite1", "efficientnet_lite2")   # a drawn box's CAM: these
    #                              backbones' CAMs averaged with the engine's (tags ImageNet names; the engine's own
    #                              is left out; loaded on the first box)
    prior_fit: float = 0.7       # "auto": least IoU of the class evidence's mask's bounding box with the drawn box
    prior_min_prob: float = 0.0  # a drawn box: the class evidence counts when the tag's probability on the crop is this
    feature_margin: float = 0.3  # context around a box for the features' background clusters, x its side
    features_with_cam: FeatureConfig = field(            # the box's features averaged with the CAM ("auto")...
        default_factory=lambda: FeatureConfig(pass_side=448, foreground_clusters=8))
    features_alone: FeatureConfig = field(               # ...and alone (no class evidence, or a mask that misses
        default_factory=lambda: FeatureConfig(foreground_clusters=8))   # the box); chosen in the README's table
    feature_crf: CRFConfig = field(default_factory=lambda: CRFConfig(bilateral_compat=5.0))   # snaps their outline
    colour_agree: float | None = 0.9   # a box's mask then goes through GrabCut (its colour models, seeded by the
    #                                    mask) and the result replaces it when the two agree (IoU >= this): a
    #                                    trust region for an outline touch-up; None: off
    colour_sure: int = 5         # ...the mask eroded by this (px of ``work_side``) is sure foreground
    colour_iterations: int = 2   # ...GrabCut's iterations (3 gave the same on the dev objects, at more time)
    close_radius: int = 2        # a box's mask then closed with a disc of this radius (the photo's px; 0: off):
    #                              notches and pinholes of the outline filled, nothing outside the box
    click_grow: float = 0.15     # a click on a tag with a prior: the box of the photo mask's part it hits, grown
    #                              by this
    geometry: GeometryConfig = field(default_factory=GeometryConfig)


def _clip_box(box: Sequence[float], h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    c0, r0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
    c1, r1 = min(w, int(math.ceil(x1))), min(h, int(math.ceil(y1)))
    return c0, r0, max(c0 + 1, c1), max(r0 + 1, r1)


def _region(prompt: Prompt, h: int, w: int, cfg: PromptConfig) -> tuple[tuple[int, int, int, int],
                                                                          tuple[int, int, int, int] | None]:
    """(crop, box) in pixels (x0, y0, x1, y1): the box grown by the margin, or a window around the clicks."""
    if prompt.box is not None:
        box = _clip_box(prompt.box, h, w)
        bw, bh = box[2] - box[0], box[3] - box[1]
        mx, my = max(8, int(cfg.margin * bw)), max(8, int(cfg.margin * bh))
        crop = (max(0, box[0] - mx), max(0, box[1] - my), min(w, box[2] + mx), min(h, box[3] + my))
        return crop, box
    xs = [p[0] for p in prompt.positive]
    ys = [p[1] for p in prompt.positive]
    half = cfg.click_window * min(h, w) / 2
    crop = _clip_box((min(xs) - half, min(ys) - half, max(xs) + half, max(ys) + half), h, w)
    return crop, None


def _disc(shape: tuple[int, int], points: Sequence[Point], radius: int) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for x, y in points:
        cv2.circle(out, (int(round(x)), int(round(y))), max(1, radius), 1, -1)
    return out.astype(bool)


def prompt_mask(image: np.ndarray, prompt: Prompt, prior: np.ndarray | None = None,
                cfg: PromptConfig | None = None, seed: int = 0, backbone=None) -> np.ndarray:
    """Bool (H, W) mask of the object `prompt` points at on an RGB uint8 photo. `prior`: the tag's
    foreground probability (H, W) in [0, 1] over the photo, or over the crop :func:`crop_of` gives (or
    None): for a tight box and ``refine="auto"`` its CAM's (:func:`cam_foreground`), else the pipeline's.
    `backbone` (an explainers Backbone): its features cut out a box's object (None: GrabCut does)."""
    cfg = cfg or PromptConfig()
    h, w = image.shape[:2]
    crop, box = _region(prompt, h, w, cfg)
    positive = _inside(prompt.positive, h, w)
    negative = _inside(prompt.negative, h, w)
    mask = np.zeros((h, w), bool)
    if box is None or cfg.refine == "grabcut":             # clicks alone: GrabCut in a window around them
        part = _grab(image, crop, box, positive, negative, prior, cfg, seed)
    else:
        part = _box_mask(image, crop, box, positive, prior, cfg, backbone, prompt.tight)
        if part is None:
            part = _grab(image, crop, box, positive, negative, None, cfg, seed)
    x0, y0, x1, y1 = crop
    mask[y0:y1, x0:x1] = part
    mask = _keep(mask, positive, cfg)
    for point in negative:                                 # a negative click removes its region
        mask &= ~_region_at(mask, image, point, prior, cfg, seed)
    return mask


def crop_of(prompt: Prompt, shape: tuple[int, int], cfg: PromptConfig | None = None) -> tuple[int, int, int, int]:
    """The crop (x0, y0, x1, y1) the prompt's mask is worked out in (a prior may cover just that)."""
    return _region(prompt, shape[0], shape[1], cfg or PromptConfig())[0]


def _inside(points: Sequence[Point], h: int, w: int) -> list[Point]:
    return [(min(w - 1.0, max(0.0, x)), min(h - 1.0, max(0.0, y))) for x, y in points]


def _grab(image: np.ndarray, crop, box, positive, negative, prior, cfg: PromptConfig, seed: int) -> np.ndarray:
    """GrabCut's foreground over `crop` (bool, the crop's size)."""
    x0, y0, x1, y1 = crop
    ch, cw = y1 - y0, x1 - x0
    scale = min(1.0, cfg.work_side / max(ch, cw))
    sh, sw = max(1, round(ch * scale)), max(1, round(cw * scale))
    small = cv2.resize(image[y0:y1, x0:x1], (sw, sh), interpolation=cv2.INTER_AREA) if scale < 1 \
        else image[y0:y1, x0:x1]
    inside = np.zeros((sh, sw), bool)
    if box is not None:
        bx0, by0 = int((box[0] - x0) * scale), int((box[1] - y0) * scale)
        bx1 = max(bx0 + 1, int(math.ceil((box[2] - x0) * scale)))
        by1 = max(by0 + 1, int(math.ceil((box[3] - y0) * scale)))
        inside[by0:by1, bx0:bx1] = True
    else:
        inside[:] = True
    gc = np.where(inside, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    if prior is not None and cfg.prior:
        p = _on_crop(prior, image.shape[:2], crop)
        p = cv2.resize(p.astype(np.float32), (sw, sh), interpolation=cv2.INTER_LINEAR)
        low = inside & (p < cfg.prior_low)
        if low.sum() < inside.sum():                       # some probable foreground must stay
            gc[low] = cv2.GC_PR_BGD
    if box is None and prior is None:                      # clicks alone: the window's edge is background
        gc[[0, -1], :] = cv2.GC_BGD
        gc[:, [0, -1]] = cv2.GC_BGD
    radius = max(1, round(cfg.click_radius * max(sh, sw)))
    shift = lambda pts: [((x - x0) * scale, (y - y0) * scale) for x, y in pts]
    gc[_disc((sh, sw), shift(positive), radius)] = cv2.GC_FGD
    gc[_disc((sh, sw), shift(negative), radius)] = cv2.GC_BGD
    if not (gc == cv2.GC_BGD).any() or not np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD)).any():
        fg = np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD))     # GrabCut needs both sides: nothing to learn
    else:
        fg = _grabcut(small, gc, cfg.iterations, seed)
    fg &= inside
    if (sh, sw) != (ch, cw):
        fg = cv2.resize(fg.astype(np.uint8), (cw, ch), interpolation=cv2.INTER_NEAREST).astype(bool)
    return fg


def _grabcut(small: np.ndarray, gc: np.ndarray, iterations: int, seed: int = 0) -> np.ndarray:
    """GrabCut on an RGB uint8 photo from the labels `gc` (cv2.GC_*, updated in place); bool foreground."""
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(np.ascontiguousarray(small[:, :, ::-1]), gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def _fit(part: np.ndarray, crop, box) -> float:
    """How well a candidate mask (crop-sized) fills the drawn box: IoU of its bounding box with the box
    (-1 for an empty mask)."""
    tight = mask_to_box(part)
    if tight is None:
        return -1.0
    x0, y0 = crop[0], crop[1]
    return box_iou((tight[0] + x0, tight[1] + y0, tight[2] + x0, tight[3] + y0), box)


def _box_mask(image, crop, box, positive, prior, cfg: PromptConfig, backbone, tight: bool = True
              ) -> np.ndarray | None:
    """The object in the box (bool, the crop's size) by ``cfg.refine``. "auto" on a `tight` box: the
    class evidence `prior` averaged with the box's features' foreground
    (:func:`explainers.segment.box_features.box_foreground` with ``features_with_cam``, over a crop
    with ``feature_margin`` of context) and cut by the CRF, when that mask's bounding box fits the
    drawn box (IoU >= ``prior_fit``), else the features alone (``features_alone``; so does
    "features"). "auto" on a box derived from clicks, or "prior": the prior cut at 0.5. None when
    nothing applies (then GrabCut)."""
    local = [(x - crop[0], y - crop[1]) for x, y in positive]
    use_prior = prior is not None and cfg.prior and cfg.refine in ("auto", "prior")
    if use_prior and (cfg.refine == "prior" or not tight):
        cut = _prior_cut(image.shape[:2], crop, box, prior)
        cut[_disc(cut.shape, local, 2)] = True
        return cut
    if backbone is None or cfg.refine not in ("auto", "features"):
        return None
    from explainers.segment.box_features import box_foreground

    h, w = image.shape[:2]
    wide, _ = _region(Prompt(box=box), h, w, replace(cfg, margin=cfg.feature_margin))
    pixels, wbox = image[wide[1]:wide[3], wide[0]:wide[2]], _shift(box, wide)
    features = lambda fc: box_foreground(backbone, pixels, wbox, fc)
    evidence = _in_region(prior, image.shape[:2], crop, wide) if use_prior else None
    in_crop = lambda m: m[crop[1] - wide[1]:crop[3] - wide[1], crop[0] - wide[0]:crop[2] - wide[0]].copy()
    part = None
    if evidence is not None:
        p = features(cfg.features_with_cam)
        if p is None:                    # no context around the box (it covers the photo): the evidence alone
            part = _crf_cut(image, wide, evidence, box, cfg)
        else:
            part = _crf_cut(image, wide, cfg.cam_weight * evidence + (1.0 - cfg.cam_weight) * p, box, cfg)
            if _fit(_keep(in_crop(part), local, cfg), crop, box) < cfg.prior_fit:
                part = None
    if part is None:
        p = features(cfg.features_alone)
        if p is None:
            return None
        part = _crf_cut(image, wide, p, box, cfg)
    part = in_crop(_in_box(close_gaps(colour_touch_up(pixels, part, wbox, cfg), cfg.close_radius), wbox))
    part[_disc(part.shape, local, 2)] = True
    return part


def colour_touch_up(crop: np.ndarray, mask: np.ndarray, box, cfg: PromptConfig) -> np.ndarray:
    """`mask` (bool, the crop's size, nothing outside `box`) re-cut by GrabCut's colour models at
    ``work_side`` px: outside the box sure background, the mask eroded by ``colour_sure`` sure
    foreground, the rest of the box probable fore- or background as the mask says. The re-cut replaces
    the mask only when the two agree (IoU >= ``colour_agree``): the touch-up moves an outline, it
    never redraws the object (on the dev objects larger changes were as often worse as better)."""
    from explainers.segment.box_features import working_view

    if cfg.colour_agree is None or not mask.any():
        return mask
    h, w = mask.shape
    small, small_inside, inside = working_view(crop, box, cfg.work_side)
    sh, sw = small_inside.shape
    m = cv2.resize(mask.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST).astype(bool)
    if small_inside.all() or not m.any():              # no background to learn colours from
        return mask
    gc = np.where(small_inside, np.where(m, cv2.GC_PR_FGD, cv2.GC_PR_BGD), cv2.GC_BGD).astype(np.uint8)
    if cfg.colour_sure > 0:
        kernel = np.ones((cfg.colour_sure, cfg.colour_sure), np.uint8)
        gc[cv2.erode(m.astype(np.uint8), kernel).astype(bool)] = cv2.GC_FGD
    cut = _grabcut(small, gc, cfg.colour_iterations)
    cut = cv2.resize(cut.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) & inside
    agree = (cut & mask).sum() / max(1, (cut | mask).sum())
    return cut if agree >= cfg.colour_agree else mask


def _in_box(mask: np.ndarray, box) -> np.ndarray:
    """`mask` with nothing outside `box` (x0, y0, x1, y1 in its pixels)."""
    out = np.zeros_like(mask)
    out[box[1]:box[3], box[0]:box[2]] = mask[box[1]:box[3], box[0]:box[2]]
    return out


def _shift(box, region) -> tuple[int, int, int, int]:
    """`box` in the coordinates of `region` (both x0, y0, x1, y1)."""
    return box[0] - region[0], box[1] - region[1], box[2] - region[0], box[3] - region[1]


def _in_region(prior: np.ndarray, shape, crop, region) -> np.ndarray:
    """The prior (over the photo, or over `crop`) over `region`, which holds `crop`; 0 where it has none."""
    x0, y0, x1, y1 = crop
    p = _on_crop(prior, shape, crop)
    out = np.zeros((region[3] - region[1], region[2] - region[0]), np.float32)
    out[y0 - region[1]:y1 - region[1], x0 - region[0]:x1 - region[0]] = p
    return out


def _crf_cut(image, region, p: np.ndarray, box, cfg: PromptConfig) -> np.ndarray:
    """The dense CRF (``feature_crf``) over the foreground probability `p` of `region`, nothing outside
    `box` (bool, the region's size)."""
    from explainers.segment.box_features import crf_refine

    x0, y0, x1, y1 = region
    return crf_refine(image[y0:y1, x0:x1], p, _shift(box, region), cfg.feature_crf)


def _on_crop(prior: np.ndarray, shape, crop) -> np.ndarray:
    """A prior given over the photo (`shape`) or already over `crop` -> over `crop`."""
    x0, y0, x1, y1 = crop
    return prior[y0:y1, x0:x1] if prior.shape[:2] == tuple(shape) else prior


def _prior_cut(shape, crop, box, prior: np.ndarray) -> np.ndarray:
    """The prior cut at 0.5 inside the box (bool, the crop's size)."""
    x0, y0, x1, y1 = crop
    p = _on_crop(prior, shape, crop)
    inside = np.zeros(p.shape[:2], bool)
    inside[box[1] - y0:box[3] - y0, box[0] - x0:box[2] - x0] = True
    return (p >= 0.5) & inside


def cam_foreground(cam: np.ndarray, slope: float = 0.05) -> np.ndarray:
    """A CAM (h, w) in [0, 1] over a box's crop -> the tag's foreground probability there: a logistic
    of the CAM around its Otsu threshold on that crop (the object fills much of a box's crop, so the
    threshold that suits a whole photo would cut it short). float32 (h, w)."""
    import torch

    from explainers.segment.background import background_score
    from explainers.segment.config import BackgroundConfig

    cam = torch.from_numpy(np.nan_to_num(np.asarray(cam, np.float32), nan=0.0))
    unclamped = BackgroundConfig(method="otsu", slope=slope, otsu_min=0.0, otsu_max=1.0)
    return (1.0 - background_score(cam[None], unclamped)).numpy().astype(np.float32)


def _keep(mask: np.ndarray, positive: Sequence[Point], cfg: PromptConfig) -> np.ndarray:
    """The components holding a positive click (all of them when none does), else the large ones."""
    if not positive:
        return remove_islands(mask, cfg.min_component, 0.0)
    n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    ids = {int(comp[int(y), int(x)]) for x, y in positive} - {0} if n > 2 else set()
    return np.isin(comp, list(ids)) if ids else mask


def _region_at(mask: np.ndarray, image: np.ndarray, point: Point, prior, cfg: PromptConfig, seed: int) -> np.ndarray:
    """The region a positive click at `point` would select, where it touches `mask` (bool, photo size)."""
    if not mask.any():
        return np.zeros_like(mask)
    h, w = mask.shape
    crop, _ = _region(Prompt(positive=(point,)), h, w, cfg)
    x0, y0, x1, y1 = crop
    local_prior = prior[y0:y1, x0:x1] if prior is not None and prior.shape[:2] == (h, w) else None
    part = _grab(image, crop, None, [point], [], local_prior, cfg, seed)
    region = np.zeros_like(mask)
    region[y0:y1, x0:x1] = part
    return region


class PromptSegmenter:
    """Prompts -> TagMasks with an engine's class evidence where it has some (see the module docstring).

    `engine`: an :class:`explainers.segment.Tag2Mask` (on the prompt's crop, its CAM of a tag it can
    segment gives a box's class evidence, its pipeline a click's) or None (geometry only). Not
    thread-safe (the engine is not)."""

    def __init__(self, engine=None, config: PromptConfig | None = None):
        self.engine = engine
        self.config = config or PromptConfig()

    def prior(self, image: np.ndarray, prompt: Prompt, tag: str | None) -> tuple[np.ndarray | None, float]:
        """(the tag's foreground probability over the prompt's crop, or None; the tag's probability
        there, or 1). For a box drawn around the object with ``refine="auto"``: the crop's CAM through
        :func:`cam_foreground`; otherwise the engine's pipeline on the crop."""
        if self.engine is None or tag is None or not self.config.prior or not self.engine.can_segment(tag):
            return None, 1.0
        x0, y0, x1, y1 = crop_of(prompt, image.shape[:2], self.config)
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        if prompt.box is not None and prompt.tight and self.config.refine == "auto":
            maps, probs = self.engine.tag_cams(crop, [tag], ensemble=self.config.cam_ensemble)
            return cam_foreground(maps[0]), float(probs[0])
        result, probs = self.engine.predict_with_probs(crop, [tag])
        if probs is None or not result.tags:
            return None, 1.0
        fg = 1.0 - probs[0]
        fg = cv2.resize(fg.astype(np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        return np.clip(fg, 0.0, 1.0), float(result.tags[0].score)

    def click_box(self, image: np.ndarray, prompt: Prompt, tag: str | None) -> Prompt:
        """Clicks without a box on a tag the engine can segment: the box of the part of the photo's
        mask of `tag` that the positive clicks hit (grown by ``click_grow``), so the crop holds the whole
        object; the prompt unchanged when there is no such part."""
        if prompt.box is not None or self.engine is None or tag is None or not self.config.prior \
                or not self.engine.can_segment(tag):
            return prompt
        result = self.engine.predict(image, [tag])
        if not result.tags:
            return prompt
        mask = result.tags[0].mask
        _, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        h, w = mask.shape
        ids = {int(comp[int(min(h - 1, max(0, y))), int(min(w - 1, max(0, x)))]) for x, y in prompt.positive} - {0}
        if not ids:
            return prompt
        xs0 = min(stats[i, 0] for i in ids)
        ys0 = min(stats[i, 1] for i in ids)
        xs1 = max(stats[i, 0] + stats[i, 2] for i in ids)
        ys1 = max(stats[i, 1] + stats[i, 3] for i in ids)
        for x, y in prompt.positive:
            xs0, ys0, xs1, ys1 = min(xs0, x), min(ys0, y), max(xs1, x + 1), max(ys1, y + 1)
        g = self.config.click_grow
        dx, dy = g * (xs1 - xs0), g * (ys1 - ys0)
        return Prompt(box=(xs0 - dx, ys0 - dy, xs1 + dx, ys1 + dy), positive=prompt.positive,
                      negative=prompt.negative, tight=False)

    def __call__(self, image: np.ndarray, prompt: Prompt, tag: str | None = None) -> TagMask:
        prompt = self.click_box(image, prompt, tag)
        prior, tag_score = self.prior(image, prompt, tag)
        if prompt.tight and tag_score < self.config.prior_min_prob:
            prior = None                     # the classifier does not see the tag in the box: no class evidence
        mask = prompt_mask(image, prompt, prior, self.config,
                           backbone=self.engine.backbone if self.engine is not None else None)
        polygons, boxes = mask_geometry(mask, None, tag_score, self.config.geometry)
        return TagMask(tag=tag or "", mask=mask, score=tag_score, polygons=polygons, boxes=boxes)
