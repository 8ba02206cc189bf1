"""backend.labelstudio.config: labeling configs -> the controls bound to the Image (real SDK parser)."""
from __future__ import annotations

import pytest

from backend.labelstudio.config import (DEFAULT_LABEL_CONFIG, BrushControl, ChoicesControl, LabelConfigError, PolygonControl, RectangleControl, parse_label_config)


def test_default_config_has_the_four_controls_on_image():
    cfg = parse_label_config(DEFAULT_LABEL_CONFIG)
    assert cfg.image_name == "image" and cfg.image_key == "image"
    kinds = [(type(c), c.from_name, c.to_name, c.type) for c in cfg.controls]
    assert kinds == [(ChoicesControl, "tag", "image", "choices"), (BrushControl, "brush", "image", "brushlabels"),
                     (PolygonControl, "polygon", "image", "polygonlabels"),
                     (RectangleControl, "box", "image", "rectanglelabels")]
    assert "Horse" in cfg.labels and all(c.labels == cfg.labels for c in cfg.controls)
    assert cfg.choices_controls[0].multiple
    assert [c.from_name for c in cfg.region_controls] == ["brush", "polygon", "box"]
    assert cfg.skipped == {}


def test_predicted_values_mapping():
    xml = """<View><Image name="img" value="$photo"/>
      <RectangleLabels name="r" toName="img">
        <Label value="Horse" predicted_values="sorrel, zebra"/>
        <Label value="Kitty" predicted_values="tabby,tiger cat"/>
        <Label value="Dog"/>
      </RectangleLabels>
      <Choices name="c" toName="img"><Choice value="Horse"/></Choices></View>"""
    cfg = parse_label_config(xml)
    assert cfg.image_key == "photo"
    box = cfg.control("r")
    assert box.predicted_values("Horse") == ["sorrel", "zebra"]
    assert box.predicted_values("Dog") is None
    assert cfg.tag_queries() == {"Horse": ["sorrel", "zebra"], "Kitty": ["tabby", "tiger cat"], "Dog": None}
    assert not cfg.control("c").multiple
    assert box.match("horse") == "Horse" and box.match("zebra") is None


def test_only_controls_of_the_image_are_kept():
    xml = """<View><Image name="image" value="$image"/><Text name="txt" value="$text"/>
      <Labels name="ner" toName="txt"><Label value="Horse"/></Labels>
      <Choices name="sentiment" toName="txt"><Choice value="Good"/></Choices>
      <KeyPointLabels name="kp" toName="image"><Label value="Eye"/></KeyPointLabels>
      <EllipseLabels name="ell" toName="image"><Label value="Eye"/></EllipseLabels>
      <BrushLabels name="brush" toName="image"><Label value="Horse"/></BrushLabels></View>"""
    cfg = parse_label_config(xml)
    assert [c.from_name for c in cfg.controls] == ["brush"]
    assert set(cfg.skipped) == {"ner", "sentiment", "ell"}
    assert "not supported" in cfg.skipped["ell"]
    # KeyPointLabels receive no predictions: their clicks are smart-tool prompts (backend.labelstudio.context)
    assert [c.from_name for c in cfg.prompt_controls] == ["kp"]


def test_an_image_with_only_smart_keypoints_is_not_the_default_image():
    xml = """<View><Image name="a" value="$a"/><Image name="b" value="$b"/>
      <KeyPointLabels name="ka" toName="a" smart="true"><Label value="Cat"/></KeyPointLabels>
      <BrushLabels name="bb" toName="b"><Label value="Cat"/></BrushLabels></View>"""
    cfg = parse_label_config(xml)
    assert cfg.image_name == "b" and [c.from_name for c in cfg.controls] == ["bb"]
    assert [c.from_name for c in cfg.mask_controls] == ["bb"]


def test_image_chosen_by_name_when_several():
    xml = """<View><Image name="a" value="$a"/><Image name="b" value="$b"/>
      <PolygonLabels name="pa" toName="a"><Label value="Cat"/></PolygonLabels>
      <PolygonLabels name="pb" toName="b"><Label value="Dog"/></PolygonLabels></View>"""
    assert [c.from_name for c in parse_label_config(xml).controls] == ["pa"]
    cfg = parse_label_config(xml, image_name="b")
    assert [c.from_name for c in cfg.controls] == ["pb"] and cfg.image_key == "b"
    assert "another Image" in cfg.skipped["pa"]
    with pytest.raises(LabelConfigError, match="no <Image name='c'>"):
        parse_label_config(xml, image_name="c")


@pytest.mark.parametrize("xml, message", [
    ("", "empty"),
    ("<View><Image name='i' value='$i'/>", "not valid XML"),
    ("<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='A'/></Choices></View>",
     "no <Image> tag"),
    ("<View><Image name='i' value='$i'/><KeyPointLabels name='k' toName='i'><Label value='A'/></KeyPointLabels></View>",
     "no supported control"),
    ("<View><Image name='i' value='$i'/></View>", "no supported control"),
])
def test_errors_are_clear(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)
