"""Label Studio webhook bodies and JSON exports built from real Weizmann horse photos and masks.

Used by tests/test_training_jobs.py and tests/test_train_cmd.py (import as ``from ls_payloads import ...``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from backend.labelstudio.results import mask_to_rle

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="tag" toName="image" choice="multiple"><Choice value="horse"/><Choice value="pony-photo"/><Choice value="other-photo"/></Choices>
  <BrushLabels name="brush" toName="image"><Label value="horse"/></BrushLabels>
</View>"""


def horse_mask(horse_dir: Path, stem: str) -> np.ndarray:
    return np.asarray(Image.open(Path(horse_dir) / "masks" / f"{stem}.png")) > 0


def brush_result(mask: np.ndarray, label: str = "horse") -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def annotation(ann_id: int, task_id: int, project, result: list, updated_at: str = "2026-01-01T00:00:00Z") -> dict:
    return {"id": ann_id, "task": task_id, "project": project, "result": result, "was_cancelled": False,
            "created_at": updated_at, "updated_at": updated_at}


def webhook_body(action: str, project, ann: dict | None, image: str | None = None,
                 label_config: str = LABEL_CONFIG) -> dict:
    body = {"action": action, "project": {"id": project, "label_config": label_config}}
    if ann is not None:
        body["annotation"] = ann
        body["task"] = {"id": ann["task"], "project": project, "data": {"image": image}}
    return body


def horse_webhooks(horse_dir: Path, stems: list[str], project, first_id: int = 1000) -> list[dict]:
    """ANNOTATION_CREATED bodies: one brush-mask correction per photo (its ground-truth mask)."""
    out = []
    for i, stem in enumerate(stems):
        ann = annotation(first_id + i, first_id + 10_000 + i, project, [brush_result(horse_mask(horse_dir, stem))])
        out.append(webhook_body("ANNOTATION_CREATED", project, ann, str(Path(horse_dir) / "images" / f"{stem}.jpg")))
    return out


def ls_export(horse_dir: Path, stems: list[str], image_prefix: str = "/data/local-files/?d=images/") -> list[dict]:
    """A Label Studio JSON export (tasks with annotations) of `stems`, photos referenced as local files."""
    tasks = []
    for i, stem in enumerate(stems):
        tid = 500 + i
        ann = annotation(9000 + i, tid, 3, [brush_result(horse_mask(horse_dir, stem))])
        tasks.append({"id": tid, "project": 3, "data": {"image": f"{image_prefix}{stem}.jpg"},
                      "annotations": [ann], "predictions": []})
    return tasks


def choices_result(*labels: str) -> dict:
    return {"type": "choices", "from_name": "tag", "to_name": "image", "value": {"choices": list(labels)}}
