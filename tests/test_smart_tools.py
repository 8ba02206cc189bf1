"""Smart tools: prompts (a box, clicks) -> masks (explainers.segment.interactive), Label Studio's context
(backend.labelstudio.context) and the served /predict with ``params.context``, on real horse photos with the
real backbone; hostile contexts fail their task with a sentence."""
from __future__ import annotations

import numpy as np
import pytest

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.context import MAX_CONTEXT_REGIONS, SmartPrompt, is_interactive, parse_context
from backend.labelstudio.results import decode_rle
from backend.settings import Settings
from backend.web.app import create_app
from tests.conftest import horse_and_mask

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="Horse"/><Label value="Saddle blanket"/></BrushLabels>
<PolygonLabels name="poly" toName="image"><Label value="Horse"/></PolygonLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Horse" smart="true"/></KeyPointLabels>
<RectangleLabels name="rect" toName="image" smart="true"><Label value="Horse"/><Label value="Saddle blanket"/>
</RectangleLabels></View>"""
STEMS = ("horse281", "horse300", "horse315")      # test split


def _iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _box(gt, grow=0.05):
    ys, xs = np.nonzero(gt)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    dx, dy = grow * (x1 - x0) / 2, grow * (y1 - y0) / 2
    return float(x0 - dx), float(y0 - dy), float(x1 + dx), float(y1 + dy)


def _center(gt):
    import cv2

    dist = cv2.distanceTransform(np.pad(gt, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(x), float(y)


@pytest.fixture(scope="module")
def engine(backbone):
    from explainers.segment import PipelineConfig, Tag2Mask

    return Tag2Mask(backbone, PipelineConfig.preset("balanced"))


@pytest.fixture(scope="module")
def horses(horse_dir):
    return [horse_and_mask(horse_dir, s) for s in STEMS]


# -- the library -------------------------------------------------------------------------------------
def test_a_box_beats_the_zero_shot_mask(engine, horse_dir, horses):
    """Every 8th horse of the test split (7 photos, some with a poor zero-shot mask): the box's masks are
    better on the whole, and never reach outside the box; on the module's three horses none is below 0.7."""
    from explainers.segment.interactive import Prompt, PromptSegmenter

    seg = PromptSegmenter(engine)
    stems = (horse_dir / "split_test.txt").read_text().split()[::8]
    boxed_ious, plain_ious = [], []
    for stem in stems:
        image, gt = horse_and_mask(horse_dir, stem)
        boxed = seg(image, Prompt(box=_box(gt)), "horse").mask
        plain = engine.predict(image, ["horse"]).tags[0].mask
        boxed_ious.append(_iou(boxed, gt))
        plain_ious.append(_iou(plain, gt))
        x0, y0, x1, y1 = (int(v) for v in _box(gt, grow=0.2))
        outside = np.ones_like(gt)
        outside[max(0, y0):y1, max(0, x0):x1] = False
        assert not (boxed & outside).any()            # nothing outside the box
    assert len(stems) == 7 and np.median(boxed_ious) >= 0.8, boxed_ious
    assert np.mean(boxed_ious) >= np.mean(plain_ious) + 0.05, (boxed_ious, plain_ious)
    three = [_iou(seg(image, Prompt(box=_box(gt)), "horse").mask, gt) for image, gt in horses]
    assert min(three) >= 0.7, three


def test_the_cam_on_a_box_is_calibrated_on_its_crop():
    """The crop's Otsu threshold is where the foreground probability crosses 0.5: a CAM whose object
    fills most of the crop still gives most of it to the object."""
    from explainers.segment.interactive import cam_foreground

    rng = np.random.default_rng(0)
    cam = rng.uniform(0.0, 0.3, (40, 50)).astype(np.float32)      # the context
    cam[5:35, 5:45] = rng.uniform(0.55, 0.75, (30, 40))            # the object: 60 % of the crop, below the peak
    cam[15:20, 20:25] = 1.0
    fg = cam_foreground(cam)
    assert fg.dtype == np.float32 and fg.shape == cam.shape
    assert (fg[5:35, 5:45] > 0.9).all() and (fg[cam < 0.15] < 0.1).all()
    assert np.isfinite(cam_foreground(np.full((8, 8), np.nan, np.float32))).all()


def test_the_colour_touch_up_keeps_to_its_trust_region(horses):
    """GrabCut seeded by a box's mask: its re-cut stays in the box and replaces the mask only when the two
    agree (IoU >= colour_agree); a mask it would redraw (half the box) comes back as given, and so does
    every mask with the touch-up off."""
    from dataclasses import replace

    import cv2

    from explainers.segment.interactive import PromptConfig, colour_touch_up

    cfg = PromptConfig()
    for image, gt in horses:
        h, w = gt.shape
        ys, xs = np.nonzero(gt)
        box = (max(0, xs.min() - 10), max(0, ys.min() - 10), min(w, xs.max() + 11), min(h, ys.max() + 11))
        inside = np.zeros_like(gt)
        inside[box[1]:box[3], box[0]:box[2]] = True
        loose = cv2.dilate(gt.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & inside
        free = colour_touch_up(image, loose, box, replace(cfg, colour_agree=0.0))
        assert free.any() and not (free & ~inside).any() and (free != loose).any()
        out = colour_touch_up(image, loose, box, cfg)
        assert out is loose or _iou(out, loose) >= cfg.colour_agree
        assert _iou(out, gt) >= _iou(loose, gt) - 0.01
        half = inside.copy()
        half[:, (box[0] + box[2]) // 2:] = False
        assert colour_touch_up(image, half, box, cfg) is half
        assert colour_touch_up(image, loose, box, replace(cfg, colour_agree=None)) is loose


def test_the_close_fills_notches_and_pinholes_and_takes_nothing(horses):
    """close_gaps (a box's last step): a horse's true mask with pinholes and a notch 3 px wide punched in
    comes back with them filled, never loses a pixel, and a gap wider than the disc stays open; radius 0
    leaves the mask as it is."""
    from explainers.segment.postprocess import close_gaps

    for _, gt in horses:
        ys, xs = np.nonzero(gt)
        cy, cx = int(np.median(ys)), int(np.median(xs))
        punched = gt.copy()
        for dy, dx in ((0, 0), (8, 8), (-8, 6)):
            punched[cy + dy, cx + dx] = False                  # pinholes inside the body
        col = xs.min() + (xs.max() - xs.min()) // 2
        rows = np.nonzero(gt[:, col])[0]
        punched[rows.min():rows.min() + 12, col - 1:col + 2] = False   # a notch 3 px wide from the top
        wide = gt.copy()
        wide[:, col + 20:col + 40] = False                     # a gap of 20 px: the disc cannot bridge it
        out = close_gaps(punched, 2)
        assert not (punched & ~out).any()
        assert out[cy, cx] and out[cy + 8, cx + 8] and out[rows.min() + 6, col]
        assert not close_gaps(wide, 2)[:, col + 25:col + 35].any()
        assert close_gaps(punched, 0) is punched


def test_a_box_over_the_whole_photo_still_gives_the_object(engine, horses):
    """No context outside the box to learn the background from: the class prior decides."""
    from explainers.segment.interactive import Prompt, PromptSegmenter

    image, gt = horses[0]
    h, w = gt.shape
    mask = PromptSegmenter(engine)(image, Prompt(box=(0, 0, w, h)), "horse").mask
    assert mask.mean() < 0.6 and _iou(mask, gt) >= 0.6


@pytest.mark.parametrize("make_box", [
    lambda w, h: (10, 10, 11, 11), lambda w, h: (5, 5, 5, 5), lambda w, h: (-50, -50, 5000, 5000),
    lambda w, h: (w - 3, h - 3, w + 10, h + 10), lambda w, h: (20, 20, 25, 200)],
    ids=["one-pixel", "empty", "oversized", "half-outside", "sliver"])
def test_degenerate_boxes_give_a_mask_inside_the_photo(engine, horses, make_box):
    """A one-pixel, empty, oversized, half-outside or sliver box goes through the CAM-and-features path
    (clipped to the photo) and answers a mask of the photo's size, with the click kept, never an error."""
    from explainers.segment.interactive import Prompt, PromptSegmenter

    image, gt = horses[0]
    h, w = gt.shape
    box = make_box(w, h)
    seg = PromptSegmenter(engine)
    for positive in ((), ((12.0, 12.0),)):
        mask = seg(image, Prompt(box=box, positive=positive), "horse").mask
        assert mask.shape == (h, w) and mask.dtype == bool
        if box[2] - box[0] >= w:                  # a box over the whole photo: the object, not everything
            assert mask.mean() < 0.6


def test_clicks_positive_and_negative(engine, horses):
    from explainers.segment.interactive import Prompt, PromptSegmenter

    seg = PromptSegmenter(engine)
    image, gt = horses[0]
    x, y = _center(gt)
    one = seg(image, Prompt(positive=((x, y),)), "horse").mask
    assert one[int(y), int(x)] and _iou(one, gt) >= 0.6
    ys, xs = np.nonzero(one)
    far = int(np.argmax((xs - x) ** 2 + (ys - y) ** 2))
    neg = (float(xs[far]), float(ys[far]))
    two = seg(image, Prompt(positive=((x, y),), negative=(neg,)), "horse").mask
    assert not two[int(neg[1]), int(neg[0])] and two[int(y), int(x)] and two.sum() < one.sum()


def test_geometry_alone_for_a_tag_without_class_evidence(horses):
    from explainers.segment.interactive import Prompt, PromptSegmenter

    seg = PromptSegmenter(None)
    image, gt = horses[1]
    assert _iou(seg(image, Prompt(box=_box(gt))).mask, gt) >= 0.5
    with pytest.raises(ValueError, match="box or at least one positive click"):
        Prompt(negative=((1.0, 2.0),))


# -- Label Studio's context ----------------------------------------------------------------------------
def _rect(x, y, w, h, label="Horse", **extra):
    return {"type": "rectanglelabels", "from_name": "rect", "to_name": "image",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label], **extra}}


def _kp(x, y, positive=True, label="Horse"):
    return {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label], "labels": [label]}}


def test_context_regions_become_prompts():
    config = parse_label_config(CONFIG)
    assert [c.type for c in config.prompt_controls] == ["keypointlabels"] and not config.skipped
    prompts = parse_context({"result": [_rect(10, 10, 50, 40), _kp(20, 20), _kp(30, 30, False), _kp(80, 80)]},
                            config)
    assert prompts[0] == SmartPrompt("Horse", box=(10, 10, 50, 40), positive=[(20, 20)], negative=[(30, 30)])
    assert prompts[1] == SmartPrompt("Horse", positive=[(80, 80)])
    assert prompts[0].in_pixels(200, 100)[0] == (20, 10, 120, 50)
    assert SmartPrompt.from_json(prompts[0].to_json()) == prompts[0]
    assert parse_context(None, config) == [] and parse_context({"result": []}, config) == []
    assert is_interactive({"result": []}) and not is_interactive(None) and not is_interactive({})
    # a rotated rectangle stands for its upright bounds, clamped to the photo
    (rot,) = parse_context({"result": [_rect(50, 10, 20, 10, rotation=90)]}, config)
    assert rot.box == pytest.approx((40, 10, 10, 20))
    (clamped,) = parse_context({"result": [_rect(-20, 90, 50, 50)]}, config)
    assert clamped.box == (0, 90, 30, 10)


@pytest.mark.parametrize("context, words", [
    ([1], "must be an object"),
    ({"result": "all"}, "must be a list"),
    ({"result": [7]}, "region 0 must be an object"),
    ({"result": [{"type": "ellipselabels", "value": {}}]}, "keypointlabels click or a rectanglelabels box"),
    ({"result": [_rect(1, 1, float("nan"), 3)]}, "width must be a finite number"),
    ({"result": [_rect(1, 1, 1e309, 3)]}, "width must be a finite number"),
    ({"result": [_rect(1, 1, "9", 3)]}, "width must be a finite number"),
    ({"result": [_rect(1, 1, 0, 3)]}, "without area"),
    ({"result": [_rect(150, 1, 10, 3)]}, "outside the photo"),
    ({"result": [_rect(1, 1, 10, 3, label="Zebra")]}, "not a label of the config"),
    ({"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": [3]}}]}, "names no label"),
    ({"result": [dict(_kp(1, 1), is_positive="yes")]}, "is_positive must be true or false"),
    ({"result": [_kp(1, 1, positive=False)]}, "all negative"),
    ({"result": [_kp(1, 1)] * (MAX_CONTEXT_REGIONS + 1)}, "at most"),
])
def test_hostile_contexts_are_refused_with_a_sentence(context, words):
    with pytest.raises(ValueError, match=words):
        parse_context(context, parse_label_config(CONFIG))


# -- the served /predict ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(horse_dir, tmp_path_factory):
    s = Settings.from_env(env={}, model_dir=tmp_path_factory.mktemp("model_dir"), preset="balanced",
                          local_roots=[horse_dir], warmup=False)
    return create_app(s).test_client()


def test_the_warm_up_loads_the_backbones_of_a_box(horse_dir, tmp_path, monkeypatch):
    """With the warm-up on, the web process loads the engine and then the backbones whose CAMs a box
    averages (PromptConfig.cam_ensemble), before any smart tool asks: the first box waits for neither."""
    import threading

    import backend.serving.engine
    from backend.serving.engine import get_engine
    from explainers.segment.interactive import PromptConfig

    monkeypatch.setattr(backend.serving.engine, "_ENGINES", {})     # a process without an engine yet
    s = Settings.from_env(env={}, model_dir=tmp_path, preset="balanced", local_roots=[horse_dir], warmup=True)
    c = create_app(s).test_client()
    assert c.get("/health").json["model_state"] in ("loading", "loaded")
    for thread in threading.enumerate():      # the warm-up's end: the model, then the box's backbones
        if thread.name == "tag2mask-warmup":
            thread.join(120)
            assert not thread.is_alive(), "the warm-up did not finish in 120 s"
    assert c.get("/health").json["model_state"] == "loaded"
    engine, _ = get_engine(s)
    assert set(PromptConfig().cam_ensemble) <= set(engine.ensemble.loaded)


def _predict(client, horse_dir, stem, context, **task):
    body = {"tasks": [{"id": 5, "data": {"image": str(horse_dir / "images" / f"{stem}.jpg")}, **task}],
            "label_config": CONFIG, "project": "4.1700000000", "params": {"context": context}}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.json
    return r.json["results"][0]


def test_predict_with_a_box_answers_its_mask(client, horse_dir, horses):
    _, gt = horses[2]
    h, w = gt.shape
    x0, y0, x1, y1 = _box(gt)
    ctx = {"result": [_rect(100 * x0 / w, 100 * y0 / h, 100 * (x1 - x0) / w, 100 * (y1 - y0) / h)]}
    out = _predict(client, horse_dir, STEMS[2], ctx)
    brushes = [r for r in out["result"] if r["type"] == "brushlabels"]
    assert len(brushes) == 1 and brushes[0]["value"]["brushlabels"] == ["Horse"]
    assert _iou(decode_rle(brushes[0]["value"]["rle"], h, w), gt) >= 0.75
    assert any(r["type"] == "polygonlabels" for r in out["result"])
    assert not any(r["type"] in ("rectanglelabels", "choices") for r in out["result"])
    # a plain prediction of the same task is not the interactive answer (nothing is cached across)
    plain = _predict(client, horse_dir, STEMS[2], None)
    assert any(r["type"] == "rectanglelabels" for r in plain["result"])


def test_predict_with_a_label_imagenet_lacks_uses_the_geometry(client, horse_dir, horses):
    _, gt = horses[1]
    h, w = gt.shape
    x0, y0, x1, y1 = _box(gt)
    ctx = {"result": [_rect(100 * x0 / w, 100 * y0 / h, 100 * (x1 - x0) / w, 100 * (y1 - y0) / h,
                            label="Saddle blanket")]}
    out = _predict(client, horse_dir, STEMS[1], ctx)
    (brush,) = [r for r in out["result"] if r["type"] == "brushlabels"]
    assert brush["value"]["brushlabels"] == ["Saddle blanket"]


def test_predict_with_an_emptied_smart_context_answers_nothing(client, horse_dir):
    """The annotator removed the smart regions: an empty answer, not the whole pre-annotation as suggestions."""
    out = _predict(client, horse_dir, STEMS[0], {"result": []})
    assert out["result"] == [] and "error" not in out


def test_predict_with_a_malformed_context_fails_the_task_only(client, horse_dir):
    out = _predict(client, horse_dir, STEMS[0], {"result": [_rect(1, 1, "x", 3)]})
    assert "result" not in out and "width must be a finite number" in out["error"]
    out = _predict(client, horse_dir, STEMS[0], "a string")
    assert "result" not in out and "params.context must be an object" in out["error"]
