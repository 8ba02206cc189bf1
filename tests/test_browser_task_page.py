"""In a real browser: a Label Studio 1.23.2 task page shows the regions this backend predicted.

A project with a Choices + BrushLabels + PolygonLabels config for "horse" gets one Weizmann horse photo,
the real backend (``tag2mask serve``) is connected and its predictions retrieved; then headless Chromium
logs in through the login form, opens the task in the data manager and reads the rendered labeling UI:
the outliner lists one brush and one polygon region labelled "horse", both marked as predicted with the
prediction's scores; the photo is loaded; and the canvas layers drawn in the label colours cover the
predicted mask and polygon at the photo's on-screen size.

Run: ``TAG2MASK_THREADS=1 pytest tests/test_browser_task_page.py -q`` (needs scripts/browser_deps.sh's
Chromium; the Label Studio harness installs its own venv the first time). The screenshot is written into
the test's tmp dir; with TAG2MASK_UPDATE_SCREENSHOT=1 it also replaces docs/labelstudio-task-predictions.png.
On failure the page HTML and a screenshot are saved to the tmp dir and named in the message.
"""
from __future__ import annotations

import os
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.labelstudio.results import decode_rle
from tests.browser import ensure_browser, headless_chromium, ls_login, save_evidence, stage_layers
from tests.conftest import horse_stems
from tests.labelstudio import REPO, BackendProcess

pytestmark = pytest.mark.labelstudio

STEM = "horse283"          # test split; the classifier tags it as a horse
BRUSH_RGB, POLYGON_RGB = (255, 0, 0), (0, 0, 255)
CONFIG = f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <Choices name="tag" toName="image" choice="multiple" showInline="true">
    <Choice value="horse"/>
  </Choices>
  <BrushLabels name="brush" toName="image">
    <Label value="horse" background="#{bytes(BRUSH_RGB).hex()}"/>
  </BrushLabels>
  <PolygonLabels name="polygon" toName="image">
    <Label value="horse" background="#{bytes(POLYGON_RGB).hex()}"/>
  </PolygonLabels>
</View>"""
UI_TIMEOUT = 240           # the labeling UI takes ~15 s on 2 busy cores; bounded well above that
DRAWN_IOU_FLOOR = 0.85     # drawn layer vs the predicted shape scaled to the screen (edges are antialiased)
SCREENSHOT = REPO / "docs" / "labelstudio-task-predictions.png"

# the selectors this test relies on (Label Studio 1.23.2's editor)
OUTLINER_NODE = ".lsf-outliner .lsf-tree__node"                # one per region, class ..._type_<region type>
NODE_LABEL = ".lsf-outliner-item__title"
NODE_PREDICTED = ".lsf-outliner-item__control_type_predict"     # the "from a prediction" mark
NODE_SCORE = ".lsf-outliner-item__control_type_score"
PREDICTION_TAB = ".lsf-annotation-button__userpic_prediction"
PREDICTION_SCORE = "[title^='Prediction score']"
CHOICE_HORSE = ".lsf-choices input[name='horse']"


def _colour_mask(layers: list[np.ndarray], rgb: tuple[int, int, int]) -> np.ndarray:
    """Pixels drawn (alpha > 0) in colour `rgb` on any layer."""
    out = np.zeros(layers[0].shape[:2], bool)
    for layer in layers:
        px = layer.astype(int)
        close = np.abs(px[..., :3] - np.array(rgb)).max(axis=-1) < 60
        out |= close & (px[..., 3] > 0)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _ui_ready(driver):
    """The stage layers once the outliner lists two regions, the photo is loaded and both colours are drawn."""
    from selenium.webdriver.common.by import By

    if len(driver.find_elements(By.CSS_SELECTOR, OUTLINER_NODE)) < 2:
        return False
    stage = stage_layers(driver)
    if not stage or not stage["img"]["complete"] or not stage["img"]["natural_w"] or not stage["layers"]:
        return False
    if not (_colour_mask(stage["layers"], BRUSH_RGB).any() and _colour_mask(stage["layers"], POLYGON_RGB).any()):
        return False
    return stage


def _outliner(driver) -> list[dict]:
    from selenium.webdriver.common.by import By

    rows = []
    for node in driver.find_elements(By.CSS_SELECTOR, OUTLINER_NODE):
        kind = re.search(r"lsf-tree__node_type_(\w+)", node.get_attribute("class") or "")
        score = node.find_elements(By.CSS_SELECTOR, NODE_SCORE)
        rows.append({"type": kind.group(1) if kind else None,
                     "label": " ".join(e.text for e in node.find_elements(By.CSS_SELECTOR, NODE_LABEL)).strip(),
                     "predicted": bool(node.find_elements(By.CSS_SELECTOR, NODE_PREDICTED)),
                     "score": score[0].text.strip() if score else None})
    return rows


def test_task_page_lists_and_draws_the_predicted_regions(label_studio, horse_dir, tmp_path):
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    assert STEM in horse_stems("test")
    ensure_browser()
    ls, timings, t = label_studio, {}, time.monotonic()
    photo = horse_dir / "images" / f"{STEM}.jpg"
    (tmp_path / "backend").mkdir()
    with BackendProcess(env={"TAG2MASK_PRESET": "fast"}, workdir=tmp_path / "backend") as backend:
        proj = ls.create_project("tag2mask browser check", CONFIG)
        [task_id] = ls.import_files(proj["id"], [photo])
        ls.connect_ml(proj["id"], backend.url)
        ls.retrieve_predictions(proj["id"])
        preds = ls.predictions(task_id)
        assert len(preds) == 1, f"task {task_id} has {len(preds)} predictions"
        pred = preds[0]
        by_type = {r["type"]: r for r in pred["result"]}
        assert {"choices", "brushlabels", "polygonlabels"} <= set(by_type), sorted(by_type)
        timings["predictions_s"] = round(time.monotonic() - t, 1)

        with headless_chromium() as driver:
            t = time.monotonic()
            try:
                ls_login(driver, ls)
                driver.get(f"{ls.url}/projects/{proj['id']}/data?task={task_id}")
                stage = WebDriverWait(driver, UI_TIMEOUT, poll_frequency=1).until(_ui_ready)
                timings["ui_ready_s"] = round(time.monotonic() - t, 1)
                _check_page(driver, pred, by_type, stage, photo, timings)
            except (AssertionError, TimeoutException, WebDriverException) as e:
                html, png = save_evidence(driver, tmp_path, "task-page-failure")
                what = f"the labeling UI did not show both regions in {UI_TIMEOUT} s" \
                    if isinstance(e, TimeoutException) else str(e)
                raise AssertionError(f"{what}\npage HTML: {html}\nscreenshot: {png}") from e
            shot = tmp_path / "task-page.png"
            driver.save_screenshot(str(shot))
    if os.environ.get("TAG2MASK_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    print("\nbrowser check:", timings, "screenshot:", shot)


def _check_page(driver, pred: dict, by_type: dict, stage: dict, photo, timings: dict) -> None:
    from selenium.webdriver.common.by import By

    # the outliner: one brush and one polygon region, "horse", from the prediction, with its scores
    rows = _outliner(driver)
    assert sorted(r["type"] for r in rows) == ["brushregion", "polygonregion"], rows
    for row in rows:
        result = by_type["brushlabels" if row["type"] == "brushregion" else "polygonlabels"]
        assert row["label"] == "horse", row
        assert row["predicted"], f"region not marked as predicted: {row}"
        assert row["score"] is not None and abs(float(row["score"]) - result["score"]) < 0.006, (row, result["score"])
    # the prediction's own tab with its score, and the predicted choice ticked
    assert driver.find_elements(By.CSS_SELECTOR, PREDICTION_TAB), "no prediction tab above the editor"
    titles = [e.get_attribute("title") for e in driver.find_elements(By.CSS_SELECTOR, PREDICTION_SCORE)]
    assert any(abs(float(x.split("=")[-1]) - pred["score"]) < 1e-3 for x in titles), (titles, pred["score"])
    assert driver.find_element(By.CSS_SELECTOR, CHOICE_HORSE).is_selected(), "the predicted choice is not ticked"

    # the photo: loaded at its natural size, shown with its aspect ratio
    box = stage["img"]
    with Image.open(photo) as im:
        w, h = im.size
    assert (box["natural_w"], box["natural_h"]) == (w, h), box
    assert box["w"] > 100 and abs(box["w"] / box["h"] - w / h) < 0.02, box

    # the canvas: brush layer over the predicted mask, polygon layer over the predicted polygon
    sw, sh = stage["layers"][0].shape[1], stage["layers"][0].shape[0]
    brush = decode_rle(by_type["brushlabels"]["value"]["rle"], h, w)
    want_brush = np.asarray(Image.fromarray(brush).resize((sw, sh), Image.NEAREST))
    poly = Image.new("1", (sw, sh))
    ImageDraw.Draw(poly).polygon([(x * sw / 100, y * sh / 100) for x, y in by_type["polygonlabels"]["value"]["points"]],
                                 fill=1)
    drawn_brush = _colour_mask(stage["layers"], BRUSH_RGB)
    drawn_poly = _colour_mask(stage["layers"], POLYGON_RGB)
    timings["brush_iou"] = round(_iou(drawn_brush, want_brush), 3)
    timings["polygon_iou"] = round(_iou(drawn_poly, np.asarray(poly)), 3)
    assert timings["brush_iou"] > DRAWN_IOU_FLOOR, f"brush drawn vs predicted IoU {timings['brush_iou']}"
    assert timings["polygon_iou"] > DRAWN_IOU_FLOOR, f"polygon drawn vs predicted IoU {timings['polygon_iou']}"
