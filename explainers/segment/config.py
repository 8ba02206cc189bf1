"""Settings of the tags -> mask pipeline: one small dataclass per stage, grouped in :class:`PipelineConfig`.

Each stage reads only its own section, so a stage can be swapped or switched off (``crf.enabled``,
``cam.flip``...) without touching the others. ``PipelineConfig.preset(name)`` gives the tuned
settings ("fast", "balanced", "best"); values were chosen on the train split of the Weizmann horses
(see benchmarks/quality.py); benchmarks/multiclass_quality.py measures them on multi-class scenes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


@dataclass
class CAMConfig:
    method: str = "gradcam"                  # a key of explainers.cams.METHODS ("gradcam", "cam")
    scales: tuple[float, ...] = (1.0,)       # photo short side = scale * base_size for each pass
    base_size: int = 224
    scale_weight_power: float = 0.0          # per tag, a scale's maps weigh (its tag probability) ** this; 0 = equal
    max_side: int = 640                      # cap on a pass's long side (pixels), against huge inputs
    flip: bool = True                        # add the horizontally flipped photo at every scale...
    flip_max_scale: float | None = None      # ...up to this one (None = all)
    fusion: bool = False                     # fuse backbone.fusion_layers instead of target_layers
    layers: tuple[str, ...] | None = None    # explicit layer names (overrides `fusion`)
    work_side: int = 320                     # long side of the working resolution (CAM, background, CRF)
    affinity: bool = True                    # propagate the CAMs along the feature similarity of a middle layer
    affinity_layer: str | None = None        # that layer; None = the shallowest of backbone.fusion_layers
    affinity_scale: float | None = None      # the pass (nearest scale) whose features the walk uses; None = largest
    affinity_beta: float = 3.0               # affinity = relu(cosine similarity) ** beta
    affinity_steps: int = 8                  # random-walk steps
    cover_limit: float = 0.55                # clutter guard: when the propagated map's Otsu foreground covers
    #                                          more of the photo than this, the walk has spread over the scene;
    #                                          fall back as `cover_fallback` says (1.0 = off). Train split, all
    #                                          278: fg IoU 0.811 -> 0.821 (0.5: 0.821, 0.45: 0.816, 0.6: 0.820)
    cover_fallback: str = "raw"              # "raw": the map before the walk; "product": sqrt(raw * propagated)
    ensemble: tuple[str, ...] = ()           # more backbones (names) whose CAMs, made with these settings, are
    #                                          averaged with the engine's own (maps and tag probabilities)


@dataclass
class BackgroundConfig:
    method: str = "auto"         # "power": (1 - max cam)^alpha; "sigmoid": fixed threshold; "otsu": per-map
    #                              threshold; "auto": calibrated per backbone (background.CALIBRATION)
    alpha: float = 1.0           # power method exponent: larger -> less background
    threshold: float = 0.5       # sigmoid method: cam value where fg prob = 0.5
    slope: float = 0.1           # sigmoid/otsu methods: temperature
    otsu_min: float = 0.2        # otsu method: bounds of the per-map threshold
    otsu_max: float = 0.8
    presence_power: float = 0.0  # weight of a tag = (its prob. / the top tag prob.) ** this; 0 = trust every tag.
    #                              COCO dev, 5 folds: 1.0 -> mean fg IoU 0.247 -> 0.262 (MSRC dev, horses: same),
    #                              but it also drops a real, less likely object (a horse beside a cat): kept at 0
    presence_gate: float = 0.0   # a tag whose prob. / the top tag prob. is below this gets no pixels (empty mask)
    min_prob: float = 1e-3       # floor of every class probability (keeps the CRF unary finite)


@dataclass
class CRFConfig:
    enabled: bool = True
    iterations: int = 5
    gauss_sxy: float = 3.0       # smoothness kernel, in pixels of the working resolution
    gauss_compat: float = 3.0
    bilateral_sxy: float = 80.0  # appearance kernel: spatial scale (pixels of the working resolution)
    bilateral_srgb: float = 5.0   # appearance kernel: colour scale
    bilateral_compat: float = 10.0
    unary_power: float = 1.0     # sharpen (>1) or flatten (<1) the unary before the CRF


@dataclass
class PostprocessConfig:
    min_island: float = 0.02     # drop components smaller than this fraction of the tag's largest one...
    min_area: float = 0.0005     # ...or of the photo's area
    fill_holes: bool = True
    max_hole: float = 0.05       # only fill holes smaller than this fraction of the component's area (1.0 = all)
    smooth: int = 0              # radius (px at original resolution, scaled by size) of an open+close; 0 = off


@dataclass
class GeometryConfig:
    epsilon: float = 0.005       # approxPolyDP tolerance as a fraction of the component's perimeter
    max_points: int = 200        # cap per polygon (tolerance grows until it fits)
    min_points: int = 3


@dataclass
class FusionConfig:
    """How a project's trained heads (``Tag2Mask(heads=...)``) enter the pipeline.

    The seg head's probabilities are blended into the CRF's unary for the tags it knows (tags it
    lacks keep the CAM alone). ``head_cam`` says which tags take their CAM (and score) from the
    classifier head (:mod:`explainers.segment.head_cam`) instead of the backbone's ImageNet classifier:
    "unknown" = the tags ImageNet cannot name that the head knows; "auto" = those, plus the head's
    labels it was trained on at least ``head_min_negatives`` photos without (it learnt where they are
    absent); "always" = every tag the head knows; "off" = none (a tag ImageNet cannot name then
    fails as without heads).
    """
    enabled: bool = True
    seg_weight: float = 0.7      # 0 = CAM only, 1 = seg head only (for the tags it knows)
    mode: str = "linear"         # "linear": (1-w) p_cam + w p_seg; "log": p_cam^(1-w) p_seg^w, renormalised
    flip: bool = True            # average the seg head over the photo and its mirror image
    head_cam: str = "auto"       # "auto" | "unknown" | "always" | "off" (see above). benchmarks/head_cam.py,
    #                              49 test horses: a head trained on 10-50 tagged horses + 12 other photos gives
    #                              fg IoU 0.78-0.79 vs 0.731 for ImageNet's "horse", but one trained on horses
    #                              alone (the label never absent) 0.37: "auto" takes the head only in the first case
    head_min_negatives: int = 5  # "auto": photos without the label the head must have been trained on


@dataclass
class PipelineConfig:
    cam: CAMConfig = field(default_factory=CAMConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    keep_cams: bool = True       # fill PhotoResult.cams (tag -> CAM at original size)

    @classmethod
    def preset(cls, name: str = "balanced") -> "PipelineConfig":
        """Tuned settings: "fast" (interactive), "balanced" (default), "best" (offline, slower)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    def replace(self, **changes: Any) -> "PipelineConfig":
        """A copy with dotted-path changes, e.g. ``cfg.replace(**{"crf.enabled": False})``."""
        new = copy.deepcopy(self)
        for path, value in changes.items():
            obj = new
            *parents, last = path.split(".")
            for part in parents:
                obj = getattr(obj, part)
            if not hasattr(obj, last):
                raise AttributeError(f"no setting {path!r}")
            setattr(obj, last, value)
        return new

    def to_dict(self) -> dict:
        def conv(obj):
            if is_dataclass(obj):
                return {f.name: conv(getattr(obj, f.name)) for f in fields(obj)}
            return list(obj) if isinstance(obj, tuple) else obj
        return conv(self)


PRESETS: dict[str, PipelineConfig] = {
    # one pass at 224, no flip, CRF at 256 px
    "fast": PipelineConfig(cam=CAMConfig(scales=(1.0,), flip=False, work_side=256)),
    # the default: one pass + its mirror image, affinity propagation, CRF at 320 px. A second pass at 448 px
    # weighted per tag by its probability (cam.scales=(1, 2), scale_weight_power=1, affinity_scale=1,
    # flip_max_scale=1) gains on every set (COCO 0.247 -> 0.276, MSRC dev 295 0.701 -> 0.733, horse train
    # 278 0.821 -> 0.823; MSRC test 0.763 -> 0.767, horse test 0.731 -> 0.743) but doubles /predict's p50
    # (0.20 -> 0.41 s on 2 threads, above the 0.3 s budget): it stays off here
    "balanced": PipelineConfig(),
    # as balanced, with the CRF at 640 px and 10 iterations: finer outlines on large photos, ~2x slower.
    # (More CAM scales did not help on the train photos: 1+1.5 -> fg IoU 0.75-0.79 vs 0.81 with one.)
    # Plus the CAMs of efficientnet_lite1 and _lite2 averaged with the engine's (~3x the CAM time): on the
    # dev sets fg IoU horse train 0.827 -> 0.844, MSRC dev 0.670 -> 0.675, COCO dev 0.247 -> 0.262
    # (benchmarks/multiclass_quality.py; measured with balanced's CRF settings).
    "best": PipelineConfig(cam=CAMConfig(work_side=640, ensemble=("efficientnet_lite1", "efficientnet_lite2")),
                           crf=CRFConfig(iterations=10)),
}
