"""Guided backprop: the guided rule itself on a small model, batching on real photos, and the
user's model left as it was."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explainers.cams import GradCAM
from explainers.guided import GuidedBackprop, GuidedReLU, guided_copy, guided_gradcam

CAT = (281, 282, 283, 284, 285)
SORREL = 339


def _after_relu(act: nn.Module) -> nn.Sequential:
    """A small classifier that *starts* with the activation, so the input gradient is the
    gradient arriving at the activation's input."""
    torch.manual_seed(0)
    return nn.Sequential(
        act,
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).eval()


@pytest.mark.parametrize("act,upper", [(nn.ReLU(), None), (nn.ReLU6(inplace=True), 6.0)])
def test_guided_gradient_is_non_negative_and_zero_where_input_was_inactive(act, upper):
    model = _after_relu(act)
    torch.manual_seed(1)
    z = torch.randn(3, 4, 12, 12) * 4                       # pre-activation values, many < 0 and some > 6
    gb = GuidedBackprop(model)(z, [[0, 3], [1, 2], [4, 0]])
    assert gb.shape == (3, 2, 4, 12, 12)
    inactive = z <= 0 if upper is None else (z <= 0) | (z >= upper)
    assert (gb >= 0).all()                                   # no negative gradient passes the ReLU
    assert (gb[inactive.unsqueeze(1).expand_as(gb)] == 0).all()
    assert (gb > 0).any()                                    # something was propagated
    # the plain gradient at the same place has negative parts: guided backprop differs from it
    zz = z.clone().requires_grad_(True)
    plain = torch.autograd.grad(model(zz * 1)[:, 0].sum(), zz)[0]   # (* 1: the in-place ReLU6 needs a non-leaf)
    assert (plain < 0).any()
    assert not torch.allclose(plain, gb[:, 0])
    # the plain gradient also passes nothing where the input was inactive: only the sign rule differs
    assert (plain[inactive] == 0).all()


def test_guided_copy_swaps_every_relu_only_in_the_copy(backbone):
    model = backbone.model
    before = [(n, type(m)) for n, m in model.named_modules()]
    clone = guided_copy(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in clone.modules())
    n_relu = sum(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())
    assert n_relu > 20                                        # timm's BatchNormAct2d.act (ReLU6, in-place)
    assert sum(isinstance(m, GuidedReLU) for m in clone.modules()) == n_relu
    assert all(not p.requires_grad for p in clone.parameters())
    x = backbone.to_tensor(np.full((64, 64, 3), 100, np.uint8))
    with torch.no_grad():                                     # same forward as the original
        torch.testing.assert_close(clone(x), model(x))


def test_batch_equals_single_and_guided_gradcam(backbone, chelsea, horse_photo):
    photo, _ = horse_photo
    x = backbone.to_tensor([chelsea, photo], 128)
    targets = [[CAT, SORREL], [SORREL, 281]]
    gb = GuidedBackprop(backbone)
    batch = gb(x, targets)
    assert batch.shape == (2, 2, 3, 128, 128) and batch.device == x.device
    for b in range(2):
        torch.testing.assert_close(batch[b], gb(x[b:b + 1], [targets[b]])[0], atol=1e-5, rtol=1e-3)
    assert not torch.allclose(batch[0, 0], batch[0, 1])      # each target its own gradient
    ggc = guided_gradcam(backbone, x, targets)
    cam = GradCAM(backbone)(x, targets)
    torch.testing.assert_close(ggc, batch * cam.unsqueeze(2), atol=1e-6, rtol=1e-4)
    for b in range(2):
        torch.testing.assert_close(ggc[b], guided_gradcam(backbone, x[b:b + 1], [targets[b]])[0],
                                   atol=1e-5, rtol=1e-3)
    # the guided gradient of "cat" on the cat photo is concentrated on the cat's face
    energy = batch[0, 0].abs().sum(0)
    h = energy.shape[0]
    face = energy[int(0.13 * h):int(0.93 * h), int(0.22 * h):int(0.8 * h)].sum()
    assert face / energy.sum() > 0.6
