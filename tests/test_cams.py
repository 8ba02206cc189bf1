"""CAM methods on real photos and real pretrained weights: agreement between methods, batching,
localisation, and no side effects on the model."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from explainers import LayerNotFoundError, load_backbone
from explainers.activations import activation_maps
from explainers.cams import CAM, METHODS, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from explainers.explain import EXPLAIN_METHODS, explain
from explainers.filter_patterns import filter_pattern
from explainers.guided import GuidedBackprop, guided_gradcam
from explainers.imageio import load_image
from conftest import horse_stems

CAT = (281, 282, 283, 284, 285)   # ImageNet domestic cats
SORREL = 339
# A coarse box around chelsea's face (300 x 451 photo): x0, y0, x1, y1 in pixels.
CAT_FACE = (100, 40, 360, 280)


def _horse(horse_dir, stem):
    img = load_image(horse_dir / "images" / f"{stem}.jpg")
    mask = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
    return img, mask


@pytest.fixture(scope="module")
def photos(chelsea, horse_dir):
    """Three real photos (cat, two horses) at 160 px, as one batch."""
    return [chelsea] + [_horse(horse_dir, s)[0] for s in horse_stems("test")[1:3]]


def _peak(m: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    return int(x), int(y)


@pytest.mark.parametrize("name,layer", [("backbone", "bn2"), ("mobilenet", "features.18")])
def test_gradcam_equals_cam_up_to_positive_factor_on_gap_linear_head(request, name, layer, photos):
    bb = request.getfixturevalue(name)
    x = bb.to_tensor(photos[:2], 224)
    targets = [[CAT, SORREL], [SORREL, 281]]                   # a class set, K = 2 per photo
    cam = CAM(bb, layer)(x, targets, normalize=False)
    grad = GradCAM(bb, layer)(x, targets, normalize=False)
    assert cam.shape == grad.shape == (2, 2, 224, 224)
    for b in range(2):
        for k in range(2):
            c, g = cam[b, k].flatten().double(), grad[b, k].flatten().double()
            assert c.abs().max() > 0
            factor = (c @ g) / (c @ c)
            assert factor > 0
            assert torch.linalg.norm(g - factor * c) <= 1e-4 * torch.linalg.norm(g)
    # different targets really give different maps (so the check above is not vacuous)
    assert not torch.allclose(cam[0, 0] / cam[0, 0].max(), cam[0, 1] / cam[0, 1].max(), atol=0.05)


def test_gradcampp_closed_form_on_gap_head(backbone, photos):
    """On GAP + linear the gradient is W_c / (h w) everywhere, so the Grad-CAM++ weight is
    h w relu(g_c) / (2 + S_c g_c) with S_c the activation sum: check the implementation against it."""
    x = backbone.to_tensor(photos[0], 160)
    gpp = GradCAMPlusPlus(backbone)
    acts = activation_maps(backbone, x, ["bn2"])["bn2"]                      # (1, C, h, w)
    h, w = acts.shape[-2:]
    g = backbone.model.classifier.weight[SORREL] / (h * w)
    s = acts.sum(dim=(2, 3))[0]
    expected = torch.relu(torch.einsum("c,chw->hw", h * w * torch.relu(g) / (2 + s * g), acts[0]))
    got = gpp(x, SORREL, output_size=(h, w), normalize=False)[0, 0]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_layercam_closed_form_on_gap_head(backbone, photos):
    """On GAP + linear, Layer-CAM is ReLU(sum_c ReLU(W_c / hw) A_c)."""
    x = backbone.to_tensor(photos[1], 160)
    acts = activation_maps(backbone, x, ["bn2"])["bn2"][0]
    h, w = acts.shape[-2:]
    g = backbone.model.classifier.weight[SORREL] / (h * w)
    expected = torch.relu(torch.einsum("c,chw->hw", torch.relu(g), acts))
    got = LayerCAM(backbone)(x, SORREL, output_size=(h, w), normalize=False)[0, 0]
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_forward_pass_counts(backbone, photos):
    """All K targets of a batch from one forward; Score-CAM adds ceil(B * C / batch_size) forwards."""
    x = backbone.to_tensor(photos, 96)
    targets = [[CAT, SORREL, 1]] * 3
    calls = []
    handle = backbone.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        for cls in (GradCAM, GradCAMPlusPlus, LayerCAM, CAM):
            calls.clear()
            cls(backbone)(x, targets)
            assert calls == [3], cls.__name__
        calls.clear()
        ScoreCAM(backbone, "blocks.1", batch_size=10)(x, targets)                 # 3 x 24 masked inputs
        assert calls == [3] + [10] * 7 + [2]
        calls.clear()
        GuidedBackprop(backbone)(x, targets)                                      # runs on its own copy
        assert calls == []
    finally:
        handle.remove()


def _explainers(bb):
    return {
        "cam": CAM(bb),
        "gradcam": GradCAM(bb),
        "gradcam++": GradCAMPlusPlus(bb),
        "layercam": LayerCAM(bb, "blocks.5"),
        "fusion": GradCAM(bb, bb.fusion_layers),
        "scorecam-full": ScoreCAM(bb, "blocks.1", batch_size=7),     # 24 channels: every channel, chunks across images
        "scorecam-capped": ScoreCAM(bb, max_channels=24, batch_size=16),
    }


def test_batch_equals_single_image_calls_for_every_method(backbone, photos):
    x = backbone.to_tensor(photos, 160)
    targets = [[CAT, SORREL], [SORREL, [SORREL, 603]], [SORREL, 281]]
    for name, method in _explainers(backbone).items():
        batch = method(x, targets)
        assert batch.shape == (3, 2, 160, 160), name
        assert batch.device == x.device
        for b in range(3):
            single = method(x[b:b + 1], [targets[b]])
            torch.testing.assert_close(batch[b], single[0], atol=2e-3, rtol=0, msg=name)
        assert float(batch.min()) >= 0 and float(batch.max()) <= 1
    # top-1 targets (None) also batch
    top = GradCAM(backbone)(x)
    torch.testing.assert_close(top[1], GradCAM(backbone)(x[1:2])[0], atol=2e-3, rtol=0)


def test_scorecam_full_path_matches_naive_loop(backbone, photos):
    """The batched, chunked Score-CAM weights equal a naive one-mask-at-a-time computation."""
    x = backbone.to_tensor(photos[:2], 96)
    sc = ScoreCAM(backbone, "blocks.1", batch_size=5)
    got = sc(x, [[CAT, SORREL], [SORREL, 281]], normalize=False)
    model = backbone.model
    with torch.no_grad():
        act = activation_maps(backbone, x, ["blocks.1"])["blocks.1"]
        for b, tg in enumerate([[CAT, [SORREL]], [[SORREL], [281]]]):
            scores = []
            for c in range(act.shape[1]):
                m = torch.nn.functional.interpolate(act[b:b + 1, c:c + 1], size=x.shape[-2:], mode="bilinear",
                                                    align_corners=False)
                m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
                logits = model(x[b:b + 1] * m)[0]
                scores.append([logits[list(t)].logsumexp(0) for t in tg])
            w = torch.tensor(scores).softmax(dim=0)                              # (C, K)
            for k in range(2):
                ref = torch.relu(torch.einsum("c,chw->hw", w[:, k], act[b]))
                ref = torch.nn.functional.interpolate(ref[None, None], size=x.shape[-2:], mode="bilinear",
                                                      align_corners=False)[0, 0]
                torch.testing.assert_close(got[b, k], ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "scorecam"])
def test_peak_on_the_cat(backbone, chelsea, method):
    x = backbone.to_tensor(chelsea, 224)
    kwargs = {"max_channels": 64} if method == "scorecam" else {}
    m = METHODS[method](backbone, **kwargs)(x, [[CAT, SORREL]], output_size=chelsea.shape[:2])[0]
    x0, y0, x1, y1 = CAT_FACE
    px, py = _peak(m[0].numpy())
    assert x0 <= px <= x1 and y0 <= py <= y1, (method, px, py)
    if method in ("cam", "gradcam"):
        # the map of "sorrel" (wrong class) does not peak on the face: the check can fail
        qx, qy = _peak(m[1].numpy())
        assert not (x0 <= qx <= x1 and y0 <= qy <= y1)


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++", "layercam", "scorecam"])
def test_peak_inside_the_horse(backbone, horse_dir, method):
    stems = horse_stems("test")[1:5]   # horse279 looks spotted (top-1 "Great Dane"); Score-CAM misses it
    imgs, masks = zip(*[_horse(horse_dir, s) for s in stems])
    x = backbone.to_tensor(list(imgs), 224)
    kwargs = {"max_channels": 64} if method == "scorecam" else {}
    maps = METHODS[method](backbone, **kwargs)(x, SORREL)
    for stem, img, mask, m in zip(stems, imgs, masks, maps[:, 0]):
        m = cv2.resize(m.numpy(), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
        grown = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
        px, py = _peak(m)
        assert grown[py, px], (method, stem, px, py)


def test_wrong_layer_lists_valid_names(backbone):
    for cls in (GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM):
        with pytest.raises(LayerNotFoundError) as err:
            cls(backbone, "bn3")
        msg = str(err.value)
        assert "bn3" in msg and "bn2" in msg and "blocks.6" in msg
    with pytest.raises(LayerNotFoundError):
        guided_gradcam(backbone, backbone.to_tensor(np.zeros((32, 32, 3), np.uint8)), 1, "nope")
    with pytest.raises(LayerNotFoundError):
        filter_pattern(backbone, "nope", 0, steps=1)
    with pytest.raises(LayerNotFoundError):
        activation_maps(backbone, torch.zeros(3, 32, 32), ["nope"])


# -- no side effects on the user's model --------------------------------------------------------

def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "modes": [m.training for m in model.modules()],
    }


def _assert_untouched(model, snap, what):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["state"][k]), (what, k)
    assert [p.requires_grad for p in model.parameters()] == snap["flags"], what
    assert all(p.grad is None for p in model.parameters()), what
    assert [(n, type(m)) for n, m in model.named_modules()] == snap["types"], what
    assert [m.training for m in model.modules()] == snap["modes"], what
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, (what, n)
        assert not getattr(m, "_backward_pre_hooks", None), (what, n)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_no_method_changes_the_model(name, chelsea):
    bb = load_backbone(name, device="cpu")
    # a user model whose parameters (half of them) require gradients: .backward() would leave .grad
    for i, p in enumerate(bb.model.parameters()):
        p.requires_grad_(i % 2 == 0)
    snap = _snapshot(bb.model)
    x = bb.to_tensor([chelsea, chelsea[:, ::-1].copy()], 128)
    targets = [[CAT, SORREL], [SORREL, 281]]
    for method in ("cam", "gradcam", "gradcam++", "layercam"):
        METHODS[method](bb)(x, targets)
        _assert_untouched(bb.model, snap, method)
    ScoreCAM(bb, max_channels=8)(x, targets)
    _assert_untouched(bb.model, snap, "scorecam")
    GradCAM(bb, bb.fusion_layers)(x, targets)
    _assert_untouched(bb.model, snap, "fusion")
    GuidedBackprop(bb)(x, targets)
    _assert_untouched(bb.model, snap, "guided")
    guided_gradcam(bb, x, targets)
    _assert_untouched(bb.model, snap, "guided-gradcam")
    activation_maps(bb, x)
    _assert_untouched(bb.model, snap, "activations")
    filter_pattern(bb, bb.target_layers[0], [0, 1], steps=3, size=32)
    _assert_untouched(bb.model, snap, "filters")
    for method in EXPLAIN_METHODS:
        explain(bb, chelsea, method, steps=3, max_channels=8, size=96)
        _assert_untouched(bb.model, snap, f"explain {method}")
    # a method that fails half-way leaves no hooks either
    with pytest.raises(ValueError):
        GradCAM(bb)(x, [[CAT], [5000]])
    _assert_untouched(bb.model, snap, "failed call")
