"""backend.labelstudio.results: PhotoResult objects built by hand from real horse masks -> Label Studio items."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.labelstudio.results import decode_rle, make_prediction, mask_to_rle, photo_to_results
from explainers.segment.types import Box, PhotoResult, Polygon, TagMask
from tests.conftest import horse_stems


def _tag_mask(tag: str, mask: np.ndarray, score: float) -> TagMask:
    """A TagMask with polygons (outer contours) and boxes (one per component) of a real mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [Polygon([(float(x), float(y)) for x, y in c[:, 0, :]], score) for c in contours if len(c) >= 3]
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    boxes = [Box(float(x), float(y), float(x + w), float(y + h), score) for x, y, w, h, _ in stats[1:n]]
    return TagMask(tag=tag, mask=mask.astype(bool), score=score, polygons=polys, boxes=boxes)


@pytest.fixture(scope="module")
def horse_masks(horse_dir):
    out = []
    for stem in horse_stems("test")[:3]:
        out.append(np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0)
    return out


@pytest.fixture(scope="module")
def cfg():
    return parse_label_config(DEFAULT_LABEL_CONFIG)


def test_rle_round_trips_real_masks(horse_masks):
    for mask in horse_masks:
        h, w = mask.shape
        rle = mask_to_rle(mask)
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
        assert np.array_equal(decode_rle(rle, h, w), mask)
        # 0/255 uint8 input encodes the same
        assert mask_to_rle(mask.astype(np.uint8) * 255) == rle
    with pytest.raises(ValueError, match="expected"):
        decode_rle(mask_to_rle(horse_masks[0]), 10, 10)


def test_items_for_every_control(horse_masks, cfg):
    mask = horse_masks[0]
    h, w = mask.shape
    photo = PhotoResult(width=w, height=h, tags=[_tag_mask("Horse", mask, 0.83)])
    items = photo_to_results(photo, cfg)
    types = [i["type"] for i in items]
    assert types[0] == "choices" and types.count("brushlabels") == 1
    assert types.count("polygonlabels") == len(photo.tags[0].polygons) >= 1
    assert types.count("rectanglelabels") == len(photo.tags[0].boxes) >= 1
    assert len({i["id"] for i in items}) == len(items)
    by_type = {t: [i for i in items if i["type"] == t] for t in set(types)}
    ch = by_type["choices"][0]
    assert ch["value"] == {"choices": ["Horse"]} and ch["from_name"] == "tag" and ch["to_name"] == "image"
    for item in items:
        assert 0.0 <= item["score"] <= 1.0 and item["to_name"] == "image"
        if item["type"] != "choices":
            assert (item["original_width"], item["original_height"], item["image_rotation"]) == (w, h, 0)
    brush = by_type["brushlabels"][0]
    assert brush["from_name"] == "brush" and brush["value"]["format"] == "rle"
    assert brush["value"]["brushlabels"] == ["Horse"]
    assert np.array_equal(decode_rle(brush["value"]["rle"], h, w), mask)
    for poly in by_type["polygonlabels"]:
        pts = np.array(poly["value"]["points"])
        assert poly["value"]["closed"] is True and poly["value"]["polygonlabels"] == ["Horse"]
        assert pts.min() >= 0 and pts.max() <= 100
    # the biggest polygon, rasterised back from percent, covers the mask well
    big = max(by_type["polygonlabels"], key=lambda p: len(p["value"]["points"]))
    px = np.array(big["value"]["points"]) / 100 * [w, h]
    back = np.zeros((h, w), np.uint8)
    cv2.fillPoly(back, [np.round(px).astype(np.int32)], 1)
    iou = (back.astype(bool) & mask).sum() / (back.astype(bool) | mask).sum()
    assert iou > 0.8
    for box in by_type["rectanglelabels"]:
        v = box["value"]
        assert v["rotation"] == 0 and v["rectanglelabels"] == ["Horse"]
        assert 0 <= v["x"] and 0 <= v["y"] and v["width"] > 0 and v["height"] > 0
        assert v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
    ys, xs = np.nonzero(mask)
    biggest = max(by_type["rectanglelabels"], key=lambda b: b["value"]["width"] * b["value"]["height"])["value"]
    assert abs(biggest["x"] - 100 * xs.min() / w) < 1 and abs(biggest["y"] - 100 * ys.min() / h) < 1


def test_prediction_dict_and_tag_routing(horse_masks, cfg):
    m0 = horse_masks[1]
    h, w = m0.shape
    other = np.zeros_like(m0)
    other[: h // 4, : w // 4] = True
    photo = PhotoResult(width=w, height=h, tags=[_tag_mask("horse", m0, 0.9), _tag_mask("Zebra", other, 0.4),
                                                 _tag_mask("Dog", np.zeros_like(m0), 0.1)])
    pred = make_prediction(photo, cfg, "v-test")
    assert pred["model_version"] == "v-test"
    assert pred["score"] == pytest.approx(photo.score, abs=1e-4)
    items = pred["result"]
    # "horse" matches the label "Horse" (case-insensitive); "Zebra" is no label of the config -> nothing
    labels = {lab for i in items for lab in i["value"].get(i["type"], [])}
    assert labels == {"Horse", "Dog"}
    assert items[0]["value"]["choices"] == ["Horse", "Dog"]      # best first
    # the empty Dog mask gives no brush / polygon / box
    assert [i["type"] for i in items if "Dog" in i["value"].get(i["type"], [])] == ["choices"]
    # an explicit mapping routes an engine tag to a label
    pred2 = make_prediction(photo, cfg, "v", tag_to_label={"Zebra": "Cat"})
    assert any(i["value"].get("brushlabels") == ["Cat"] for i in pred2["result"])


def test_single_choice_and_subset_of_controls(horse_masks):
    xml = """<View><Image name="im" value="$url"/>
      <Choices name="one" toName="im"><Choice value="Horse"/><Choice value="Dog"/></Choices>
      <RectangleLabels name="rect" toName="im"><Label value="Horse"/></RectangleLabels></View>"""
    cfg = parse_label_config(xml)
    m = horse_masks[2]
    h, w = m.shape
    photo = PhotoResult(width=w, height=h, tags=[_tag_mask("Dog", m, 0.3), _tag_mask("Horse", m, 0.7)])
    items = photo_to_results(photo, cfg)
    assert items[0]["value"]["choices"] == ["Horse"]                    # single choice: the best tag
    assert {i["type"] for i in items} == {"choices", "rectanglelabels"}  # no brush/polygon control here
    assert all(i["value"]["rectanglelabels"] == ["Horse"] for i in items[1:])  # Dog is not a rect label
    assert all(i["to_name"] == "im" for i in items)


def test_mask_size_mismatch_is_an_error(horse_masks, cfg):
    m = horse_masks[0]
    photo = PhotoResult(width=m.shape[1] + 1, height=m.shape[0], tags=[_tag_mask("Horse", m, 0.5)])
    with pytest.raises(ValueError, match="photo is"):
        photo_to_results(photo, cfg)
