"""Interactive answers: a photo and the prompts of Label Studio's smart tools -> the brush and polygon
items of each prompt's label (:func:`predict_prompts`).

The prompts come from ``params.context`` (:func:`backend.labelstudio.context.parse_context`); each
becomes one mask through :class:`explainers.segment.interactive.PromptSegmenter` on the process's
engine (``backend.serving.engine.get_engine``, under its inference lock), with the project's promoted
heads set as for any prediction, so a label the project's classifier head learnt has class evidence
too. A label the engine cannot segment (ImageNet lacks it, no head knows it) is cut out without class
evidence (a box: by the CNN's features inside it against its surroundings; clicks: by GrabCut around them). The masks go to the config's BrushLabels and
PolygonLabels controls that have the label (``backend.labelstudio.results.photo_to_results``); a
prompt whose mask comes out empty is named in the prediction's ``"warnings"``.

Interactive tasks are never answered from the result cache nor stored in it (the answer depends on
the prompt), and are never pushed to Label Studio as predictions: the annotator's UI shows the answer
as a suggestion.

    prompts, answer = request_prompts(context, config, version, n_tasks)   # what the web process and the
                                                      # job queue do first with a request's params.context
    prediction = predict_prompts(model, image, config, prompts, version=None)
"""
from __future__ import annotations

import logging

from backend.labelstudio.config import LabelConfig
from backend.labelstudio.context import SmartPrompt, is_interactive, parse_context
from backend.labelstudio.results import photo_to_results
from backend.serving.engine import get_engine
from backend.serving.failures import task_failure_reason

__all__ = ["predict_prompts", "request_prompts"]

log = logging.getLogger(__name__)


def request_prompts(context, config: LabelConfig, version: str, n_tasks: int) -> tuple[list[dict], list[dict] | None]:
    """(The prompts of a request's ``params.context`` as JSON, for the predict function's tasks
    (``backend.labelstudio.tasks.with_prompts``; [] for a plain prediction); the entries to answer the
    request's `n_tasks` tasks with at once, or None). At once: a malformed context fails every task
    with its sentence; a smart tool's context whose regions were removed gets empty results (not the
    whole pre-annotation as suggestions)."""
    try:
        prompts = [p.to_json() for p in parse_context(context, config)]
    except ValueError as exc:
        reason = task_failure_reason(exc)
        log.warning("params.context refused: %s", reason)
        return [], [{"model_version": version, "score": 0.0, "error": reason} for _ in range(n_tasks)]
    if is_interactive(context) and not prompts:
        return [], [{"result": [], "score": 0.0, "model_version": version} for _ in range(n_tasks)]
    return prompts, None


def predict_prompts(model, image, config: LabelConfig, prompts: list[SmartPrompt], version: str | None = None) -> dict:
    """The prediction of one photo (RGB uint8) for `prompts`: ``{"result": [brush/polygon items],
    "score", "model_version"}`` (+ ``"warnings"``). `model`: a
    :class:`backend.serving.project_model.ProjectModel` (its settings, project heads and version)."""
    from explainers.segment.interactive import Prompt, PromptSegmenter
    from explainers.segment.types import PhotoResult

    h, w = image.shape[:2]
    extra = {label: names for label, names in config.tag_queries().items() if names}
    engine, lock = get_engine(model.settings)
    version, heads = model._heads(version)
    masks, notes = [], []
    with lock:
        engine.set_heads(heads)
        engine.tag_extra = extra or None
        segmenter = PromptSegmenter(engine)
        for p in prompts:
            box, positive, negative = p.in_pixels(w, h)
            tag = p.label if engine.can_segment(p.label) else None
            tm = segmenter(image, Prompt(box=box, positive=tuple(positive), negative=tuple(negative)), tag)
            tm.tag = p.label
            log.info("smart tool: %r %s -> %.1f %% of the photo (%s)", p.label, "box" if box else "clicks",
                     100.0 * float(tm.mask.mean()), "class evidence" if tag else "geometry only")
            if not tm.mask.any():
                notes.append(f"The smart tool's {'box' if box else 'clicks'} on {p.label!r} gave an empty mask.")
            masks.append(tm)
    photo = PhotoResult(width=w, height=h, tags=masks)
    result = photo_to_results(photo, config, controls=config.mask_controls)
    score = min((tm.score for tm in masks), default=0.0)
    prediction = {"result": result, "score": round(float(score), 4), "model_version": str(version)}
    if notes:
        prediction["warnings"] = notes
    return prediction
