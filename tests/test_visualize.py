"""Pictures: overlays, gradient images, PNG files, and the `explain` entry point on a real photo."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from explainers import LayerNotFoundError
from explainers.explain import EXPLAIN_METHODS, explain
from explainers.segment.types import Box, Polygon
from explainers.visualize import gradient_image, heatmap_overlay, label_overlay, mask_overlay, save_png

CAT = (281, 282, 283, 284, 285)


def test_heatmap_overlay_colours_and_resizes(chelsea):
    cam = np.zeros((30, 45), np.float32)
    cam[10:20, 30:40] = 1.0                                   # hot on the right
    out = heatmap_overlay(chelsea, cam, alpha=0.6)
    assert out.shape == chelsea.shape and out.dtype == np.uint8
    assert not np.array_equal(out, chelsea)
    grey = heatmap_overlay(np.full((60, 90, 3), 128, np.uint8), cam, alpha=0.6).astype(int)
    hot, cold = grey[30, 70], grey[30, 10]
    assert hot[0] - hot[2] > 40 and cold[2] - cold[0] > 40    # JET: 1 -> red, 0 -> blue
    np.testing.assert_array_equal(heatmap_overlay(chelsea, torch.from_numpy(cam), alpha=0.0), chelsea)
    with pytest.raises(ValueError):
        heatmap_overlay(chelsea, cam, alpha=2)


def test_mask_overlay_distinct_colours_contours_polygons_boxes():
    rgb = np.full((100, 120, 3), 128, np.uint8)
    a = np.zeros((100, 120), bool)
    a[10:50, 10:50] = True
    b = np.zeros((100, 120), bool)
    b[60:90, 70:110] = True
    out = mask_overlay(rgb, {"horse": a, "dog": b}, labels=False,
                       polygons={"horse": [Polygon(points=[(5, 95), (40, 95), (40, 70)], score=1.0)]},
                       boxes={"dog": [Box(65, 55, 115, 95, score=1.0)], "horse": [(2, 2, 8, 8)]})
    assert out.shape == rgb.shape and out.dtype == np.uint8
    inside_a, inside_b = out[30, 30], out[75, 90]
    assert not np.array_equal(inside_a, rgb[0, 0]) and not np.array_equal(inside_b, rgb[0, 0])
    assert np.abs(inside_a.astype(int) - inside_b.astype(int)).sum() > 60    # distinct colours
    np.testing.assert_array_equal(out[30, 90], rgb[30, 90])                  # untouched outside
    assert not np.array_equal(out[10, 30], inside_a)                         # contour on the edge
    assert not np.array_equal(out[95, 20], rgb[95, 20])                      # polygon edge drawn
    assert not np.array_equal(out[55, 90], rgb[55, 90])                      # box edge drawn
    labelled = mask_overlay(rgb, {"horse": a})
    assert not np.array_equal(labelled[12:20, 12:40], out[12:20, 12:40])     # the name is written
    with pytest.raises(ValueError):
        mask_overlay(rgb, {"x": np.zeros((5, 5), bool)})


def test_fixed_colours_and_label_maps():
    rgb = np.full((100, 120, 3), 128, np.uint8)
    a = np.zeros((100, 120), bool)
    a[10:50, 10:50] = True
    red = mask_overlay(rgb, {"pred": a}, alpha=0.5, labels=False, colors={"pred": (255, 0, 0)})
    np.testing.assert_array_equal(red[30, 30], [192, 64, 64])                # half way to the given colour
    np.testing.assert_array_equal(red[30, 90], rgb[30, 90])
    labels = np.zeros((100, 120), np.int32)
    labels[10:50, 10:50] = 1
    labels[60:90, 70:110] = 3
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    out = label_overlay(rgb, labels, palette, alpha=0.5)
    np.testing.assert_array_equal(out[30, 30], [192, 64, 64])                # label 1: palette[0]
    np.testing.assert_array_equal(out[75, 90], [64, 64, 192])                # label 3: palette[2]
    np.testing.assert_array_equal(out[55, 5], rgb[55, 5])                    # label 0 untouched
    np.testing.assert_array_equal(label_overlay(rgb, np.zeros((100, 120), np.int32)), rgb)
    assert not np.array_equal(label_overlay(rgb, labels)[30, 30], rgb[30, 30])   # default palette


def test_gradient_image():
    g = np.zeros((3, 8, 8), np.float32)
    g[0, 2, 2] = 1.0
    g[1, 5, 5] = -1.0
    img = gradient_image(torch.from_numpy(g))
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [128, 128, 128]
    assert img[2, 2, 0] == 255 and img[5, 5, 1] == 0


def test_save_png_roundtrip(tmp_path, chelsea):
    path = save_png(tmp_path / "sub" / "cat.png", chelsea)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, chelsea)
    grey = save_png(tmp_path / "g.png", chelsea[..., 0])
    np.testing.assert_array_equal(cv2.imread(str(grey), cv2.IMREAD_GRAYSCALE), chelsea[..., 0])
    with pytest.raises(ValueError):
        save_png(tmp_path / "f.png", chelsea.astype(np.float32))


@pytest.mark.parametrize("method", EXPLAIN_METHODS)
def test_explain_every_method_on_a_real_photo(backbone, chelsea, method):
    pic = explain(backbone, chelsea, method, steps=6, max_channels=32, n_channels=4)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
    assert pic.shape[0] >= 100 and pic.shape[1] >= 100 and pic.std() > 10
    if method not in ("activations", "filters"):
        assert pic.shape[:2] == chelsea.shape[:2]             # one panel at the photo's size


def test_explain_several_targets_and_layers(backbone, chelsea):
    two = explain(backbone, chelsea, "gradcam", targets=[CAT, 339])
    assert two.shape[0] == chelsea.shape[0] and two.shape[1] > 2 * chelsea.shape[1]
    fused = explain(backbone, chelsea, "layercam", layer=["blocks.5", "blocks.4"], targets=CAT)
    assert fused.shape == chelsea.shape
    grids = explain(backbone, chelsea, "activations", layer=["blocks.2", "blocks.5"])
    assert grids.ndim == 3


def test_explain_errors(backbone, chelsea):
    with pytest.raises(ValueError, match="gradcam\\+\\+.*guided-gradcam"):
        explain(backbone, chelsea, "saliency")
    with pytest.raises(LayerNotFoundError, match="bn2"):
        explain(backbone, chelsea, "gradcam", layer="bn_2")
    with pytest.raises(ValueError):
        explain(backbone, chelsea.astype(np.float32), "gradcam")
