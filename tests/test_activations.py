"""Activation maps, channel grids and filter patterns on a real pretrained backbone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explainers import LayerNotFoundError, load_backbone
from explainers.activations import activation_grid, activation_maps, conv_pool_layers
from explainers.filter_patterns import filter_pattern


def test_activation_maps_default_every_conv_and_pool_layer(backbone, chelsea):
    x = backbone.to_tensor(chelsea, 160)
    maps = activation_maps(backbone, x[0])
    convs = [n for n, m in backbone.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 40 and set(convs) <= set(maps)
    assert list(maps) == conv_pool_layers(backbone.model)
    stem = maps["conv_stem"]
    assert stem.shape == (32, 80, 80) and stem.device == x.device
    with torch.no_grad():
        torch.testing.assert_close(stem, backbone.model.conv_stem(x)[0])
    assert maps["blocks.6.0.conv_pwl"].shape == (320, 5, 5)


def test_activation_maps_batch_and_named_layers(backbone, chelsea, horse_photo):
    photo, _ = horse_photo
    x = backbone.to_tensor([chelsea, photo], 128)
    batch = activation_maps(backbone, x, ["bn2", "blocks.3"])
    assert set(batch) == {"bn2", "blocks.3"}
    assert batch["bn2"].shape == (2, 1280, 4, 4)
    single = activation_maps(backbone, x[1], "blocks.3")["blocks.3"]
    torch.testing.assert_close(batch["blocks.3"][1], single, atol=1e-4, rtol=1e-4)
    with pytest.raises(LayerNotFoundError, match="bn2"):
        activation_maps(backbone, x, ["bn_2"])


def test_activation_grid(backbone, chelsea):
    act = activation_maps(backbone, backbone.to_tensor(chelsea, 224), ["blocks.5"])["blocks.5"][0]
    grid = activation_grid(act, max_channels=16, tile=28)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape[:2] == (4 * 30 + 2, 4 * 30 + 2)            # 4 x 4 tiles of 7 * 4 px, 2 px gaps
    grey = activation_grid(act, max_channels=16, tile=28, colormap=None)
    assert grey.shape == grid.shape[:2]
    # the first tile is the most active channel, min-max scaled: it reaches 0 and 255
    best = int(act.mean(dim=(1, 2)).argmax())
    tile0 = grey[2:30, 2:30]
    assert tile0.min() == 0 and tile0.max() == 255
    expected = act[best].float()
    expected = ((expected - expected.min()) / (expected.max() - expected.min()) * 255).round().byte().numpy()
    np.testing.assert_array_equal(tile0[::4, ::4], expected)
    many = activation_grid(act, max_channels=64)
    assert many.shape[0] > grid.shape[0]
    with pytest.raises(ValueError):
        activation_grid(torch.zeros(5))


def test_filter_patterns_excite_their_own_channel():
    bb = load_backbone("efficientnet_lite0", device="cpu")
    model = bb.model
    model.train()                                   # BN statistics must not move during the search
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    layer, chans = "blocks.3", [3, 17, 40]
    pics = filter_pattern(bb, layer, chans, steps=24, size=64)
    assert pics.shape == (3, 64, 64, 3) and pics.dtype == np.uint8
    assert pics.std() > 5                           # not a flat picture

    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not m._forward_hooks for m in model.modules())

    model.eval()
    acts = activation_maps(bb, bb.to_tensor(list(pics)), layer)[layer].mean(dim=(2, 3))[:, chans]   # (3 pics, 3 chans)
    grey = activation_maps(bb, bb.to_tensor(np.full((64, 64, 3), 127, np.uint8)), layer)[layer].mean(dim=(2, 3))[0, chans]
    # each pattern excites its channel far more than a grey picture and more than the other patterns do
    assert (acts.diagonal() > grey + 1.0).all()
    assert (acts.argmax(dim=0) == torch.arange(3)).all()

    one = filter_pattern(bb, layer, 17, steps=3, size=32)
    assert one.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="channels"):
        filter_pattern(bb, layer, [999], steps=1, size=32)
