"""Reading a Label Studio task: its photo reference (:func:`task_photo`) and the human tags of its
latest annotation (:func:`choose_tags`), with a sentence for each malformed part; :func:`job_task`
turns it into the predict function's task.
"""
from __future__ import annotations

import logging

from backend.labelstudio.config import LabelConfig
from backend.untrusted import clip, json_type
from backend.untrusted import task_id as checked_task_id

log = logging.getLogger(__name__)


MAX_ANNOTATED_TAGS = 50    # distinct annotated tags segmented in one photo (each costs a CAM + CRF)


MAX_TAG_CHARS = 200        # an annotated choices value no Choices control names (kept verbatim as a tag)


def _when(ann: dict) -> str:
    return str(ann.get("updated_at") or ann.get("created_at") or "")


def _id_key(value) -> tuple:
    """Sort key of an annotation id of any JSON type: numbers in order, then the rest as strings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, "" if value is None else str(value))


def choose_tags(task: dict, config: LabelConfig) -> list[str] | None:
    """Label values from the Choices of the task's most recent non-cancelled annotation, or None.

    Raises ValueError (a sentence naming the part) for annotations of the wrong JSON shape: not a
    list, an annotation / result item / value that is not an object, a choices value that is not a
    string (or one longer than MAX_TAG_CHARS where no Choices control of the config names it), or
    more than MAX_ANNOTATED_TAGS tags (each is a CAM + CRF to compute)."""
    anns = task.get("annotations")
    if anns is None:
        return None
    if not isinstance(anns, list):
        raise ValueError(f"the task's annotations must be a list, not {json_type(anns)}")
    kept = []
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise ValueError(f"annotation {k} of the task must be a JSON object, not {json_type(ann)}")
        if not ann.get("was_cancelled"):
            kept.append((k, ann))
    kept.sort(key=lambda ka: (_when(ka[1]), _id_key(ka[1].get("id"))))
    choices_names = {c.from_name: c for c in config.choices_controls}
    for k, ann in reversed(kept):
        tags = _annotation_choices(k, ann, config, choices_names)
        if tags:
            return tags
    return None


def _annotation_choices(k: int, ann: dict, config: LabelConfig, controls: dict) -> list[str]:
    """The labels of annotation `k`'s choices items on the config's Image (ValueError when malformed)."""
    result = ann.get("result")
    if result is None:
        return []
    if not isinstance(result, list):
        raise ValueError(f"the result of annotation {k} must be a list, not {json_type(result)}")
    tags: list[str] = []
    for j, item in enumerate(result):
        where = f"result item {j} of annotation {k}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be a JSON object, not {json_type(item)}")
        if item.get("type") != "choices" or item.get("to_name") != config.image_name:
            continue
        from_name = item.get("from_name")
        control = controls.get(from_name) if isinstance(from_name, str) else None
        value = item.get("value")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"the value of {where} must be a JSON object, not {json_type(value)}")
        choices = value.get("choices")
        if choices is None:
            continue
        if not isinstance(choices, list):
            raise ValueError(f"the choices of {where} must be a list, not {json_type(choices)}")
        for v in choices:
            if not isinstance(v, str):
                raise ValueError(f"a choices value of {where} must be a string, not {json_type(v)}")
            if control is None and len(v) > MAX_TAG_CHARS:
                raise ValueError(f"a choices value of {where} is {len(v)} characters long; a tag has at most "
                                 f"{MAX_TAG_CHARS}")
            label = control.match(v) if control else v
            if label and label not in tags:
                tags.append(label)
    if len(tags) > MAX_ANNOTATED_TAGS:
        raise ValueError(f"annotation {k} names {len(tags)} tags; at most {MAX_ANNOTATED_TAGS} are segmented "
                         "in one photo")
    return tags


def task_photo(task, config: LabelConfig) -> tuple:
    """(task id, photo reference) of a Label Studio task; ValueError with a sentence when the task is
    not an object, its id is unusable (:func:`backend.untrusted.task_id`), its data is not an object
    or holds no photo string under the config's image key."""
    if not isinstance(task, dict):
        raise ValueError(f"a task must be a JSON object, not {json_type(task)}")
    tid = checked_task_id(task.get("id"))
    data = task.get("data")
    key = clip(config.image_key)
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"the task's data must be a JSON object, not {json_type(data)}")
    url = (data or {}).get(config.image_key)
    if url is None or url == "":
        raise ValueError(f"task data has no {key!r} field")
    if not isinstance(url, str):
        raise ValueError(f"the task's data[{key!r}] must be a string (the photo's URL or path), not {json_type(url)}")
    return tid, url


def job_task(task, config: LabelConfig) -> dict:
    """The predict function's task for a Label Studio task (:func:`backend.serving.predict.predict_chunk`,
    in the web process and in queue workers): ``{"id", "image": its photo reference, "tags": the
    annotated tags (:func:`choose_tags`, ``[]``: the classifier picks), "ls": True}``. ValueError with
    a sentence for a malformed task (:func:`task_photo` first, so a bad id or photo is named before
    a bad annotation)."""
    tid, ref = task_photo(task, config)
    return {"id": tid, "image": ref, "tags": choose_tags(task, config) or [], "ls": True}


def with_prompts(job: dict, prompts: list[dict]) -> dict:
    """The predict function's task `job` asking for an interactive answer: ``"prompts"`` (the JSON of
    :class:`backend.labelstudio.context.SmartPrompt` s) when there are any, `job` unchanged otherwise."""
    return {**job, "prompts": prompts} if prompts else job
