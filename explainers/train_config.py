"""The settings of a training run of the heads (:class:`TrainConfig`), read by every training step.

Plain dataclass, torch-free. The fields group by step: the backbone's input (``size``, ``flip``),
the train/validation split, the classifier head, the seg head and its targets (masks, boxes as
GrabCut pseudo-masks or filled), and the refit on every example after validation
(:func:`explainers.training.refit_heads`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


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
    clf_weight_decay: float = 1e-2  # AdamW's decoupled decay of the map directions (explainers.head_training)
    clf_l2: float = 3e-3            # L2 penalty on the probabilities' weights (not the biases), added to the mean
    #                                 BCE: keeps them calibrated (a tag is chosen by them); 0 = one unpenalised fit
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
