"""One labeling config's predictions on the process's engine: which tags each photo gets, the
project's trained heads, one engine call for several photos (:class:`ProjectModel`).

Public API::

    model = ProjectModel(settings=None, project_id=None, label_config=None, version=None)
    model.setup()                          # parses label_config (LabelConfigError if unusable)
    model.model_version                    # `version` when given, else base_model_version(settings) +
                                           # "+p<project>.vN" when the project has promoted trained heads
    model.predict_images(images, config, humans, task_ids=None, version=None) -> [prediction | Exception]
    model.predict_image(image, config, human, task_id=None) -> dict      # one photo; raises its error

It is what :func:`backend.serving.predict.predict_chunk` runs Label Studio tasks on (queue workers
build one per labeling config, project and version; the web process's
:class:`backend.serving.model.Tag2MaskModel` is one).

Tags for a photo: its human tags when the task has an annotation with Choices on the Image (chosen by
:func:`backend.labelstudio.tasks.choose_tags`). Otherwise the classifier picks: the config's labels
whose ``choice_scores`` >= TAG2MASK_THRESHOLD (best first, at most TAG2MASK_MAX_TAGS); when none passes,
the single best label is used anyway (a low-confidence pre-annotation is still a useful start, and its
low score sorts it first for review). Once the project has a trained version, the scores follow what
it was annotated with: labels its classifier head learnt (present and absent) take the head's
probability, the others ImageNet's moved by how often the label was annotated
(:class:`explainers.tag_choice.TagPrior`): a project annotated "horse" in all of 20 photos stops
answering "dog" for the next horse. A label is usable when the engine can segment it
(``engine.can_segment``): the ImageNet classifier names it, or the project's promoted classifier head
was trained on it. Other labels are left out, with a warning once per config. An annotated tag that is
not usable is left out of that photo alone: the others are segmented and the prediction's
``"warnings"`` names it with the reason and a hint (``backend.labelstudio.results``); a photo none of
whose annotated tags is usable fails, its error naming each tag's reason. An annotated tag quoted in a
warning or an error is cut at MAX_ECHOED_TAG_CHARS.

Trained heads: a prediction for a project with a promoted model (``backend.storage.registry``, trained by
``backend.training.schedule``) runs the engine with that project's heads (``engine.set_heads``, under the
inference lock) and reports ``<base>+p<project>.vN``. The seg head is fused before the CRF for the
tags it knows. The classifier head makes the project's own labels usable: a label ImageNet cannot
name ("Pony photo") that the head was trained on gets its score (to be chosen as a tag) and its
CAM (so its brush, polygon and box results) from the head (:mod:`explainers.segment.head_cam`);
labels ImageNet names take the head too when it was trained on photos without them (it learnt where
they are absent), else keep the ImageNet classifier (``fusion.head_cam`` of the preset). The heads
come from one :class:`backend.serving.heads.ProjectHeadsCache` per process (``TAG2MASK_HEADS_TTL``
seconds, default 30), reading the registry in ``MODEL_DIR``, or the Redis mirror
(:class:`backend.storage.model_mirror.RedisModelStore`) for projects that registry lacks when
``REDIS_URL`` is set. A version asked for (the model's own `version`, or ``predict_images``'
`version`: the one the web process chose and keyed the result cache by) is served with its heads:
when the cache lags behind it, the registry is read again at once.
"""

from __future__ import annotations

import logging
from typing import Any

from backend.labelstudio.config import LabelConfig, LabelConfigError, parse_label_config_cached
from backend.labelstudio.results import make_prediction
from backend.serving.engine import get_engine
from backend.serving.heads import get_heads_cache
from backend.serving.versions import base_model_version, current_model_version, project_model_version
from backend.settings import Settings
from backend.untrusted import clip
from explainers.tag_choice import choose_tags

__all__ = ["ProjectModel", "MAX_ECHOED_TAG_CHARS"]

log = logging.getLogger(__name__)


MAX_ECHOED_TAG_CHARS = 80  # an annotated tag quoted in a warning or an error is cut here


def _unusable_reason(engine, tag: str) -> str:
    """Why an annotated `tag` is left out, the tag echoed at most MAX_ECHOED_TAG_CHARS long."""
    short = clip(tag, MAX_ECHOED_TAG_CHARS)
    reason = engine.unusable_reason(tag) or f"tag {short!r} is not a label of the labeling config"
    return reason if short == tag else reason.replace(repr(tag), repr(short)).replace(tag, short)


class ProjectModel:
    """Tags -> masks/polygons/boxes of photos, for one labeling config (and project)."""

    def __init__(self, settings: Settings | None = None, project_id: str | None = None,
                 label_config: str | None = None, version: str | None = None):
        self.settings = settings or Settings.from_env()
        self.project_id = project_id
        self.label_config = label_config
        self.parsed: LabelConfig | None = None
        self._unknown_warned: set[str] = set()
        self.fixed_version = version      # a queue worker reports the version the web process chose

    @property
    def model_version(self) -> str:
        """What /setup and predictions report: the base version, plus ``+p<project>.vN`` when the
        project has a promoted trained model (read from the registry now)."""
        if self.fixed_version:
            return self.fixed_version
        if self.project_id is None:
            return base_model_version(self.settings)
        return current_model_version(self.project_id, self.settings)

    def _heads(self, version: str | None = None) -> tuple[str, Any]:
        """(version to report, heads or None) for this model's project, from the process's cache.
        `version` (else the model's fixed version), when given, is reported, and its heads are
        served: the promoted model is re-read at once when the cache lags behind it."""
        want_version = version or self.fixed_version
        if self.project_id is None:
            return want_version or self.model_version, None
        cache = get_heads_cache(self.settings)
        current, heads = cache.get(self.project_id)
        if want_version:
            # the web process chose the version (and keys the result cache by it); re-read the
            # promoted model at once when the cache lags behind it
            marker = project_model_version("", self.project_id, "x")[:-1]      # "+p<project>."
            want = want_version.rsplit(marker, 1)[1] if marker in want_version else None
            if want != current:
                cache.invalidate(self.project_id)
                current, heads = cache.get(self.project_id)
                if want != current:
                    log.warning("project %s: asked for %s, serving %s", self.project_id, want, current)
            return want_version, heads
        return project_model_version(base_model_version(self.settings), self.project_id, current), heads

    def setup(self) -> None:
        """Parse the labeling config (when one is given); raises LabelConfigError if it is unusable."""
        if self.label_config:
            self.parsed = parse_label_config_cached(self.label_config)

    def use_label_config(self, label_config: str | None) -> LabelConfig:
        """The parsed labeling config: `label_config` when given (it replaces the model's), else the
        model's; LabelConfigError when there is none or it is unusable."""
        if label_config and label_config != self.label_config:
            self.label_config = label_config
            self.parsed = None
        if self.parsed is None:
            if not self.label_config:
                raise LabelConfigError("no labeling config: call /setup first or send label_config")
            self.parsed = parse_label_config_cached(self.label_config)
        return self.parsed

    def _usable_labels(self, engine, config: LabelConfig, extra: dict) -> list[str]:
        """The config's labels the engine (with this project's heads set) can segment: named by the
        ImageNet classifier, or known to the project's promoted classifier head. The others are
        warned about once per label."""
        from explainers.errors import UnknownTagError

        usable = []
        for label in config.labels:
            if engine.can_segment(label):
                usable.append(label)
                continue
            if label not in self._unknown_warned:
                self._unknown_warned.add(label)
                try:
                    engine.class_set(label)
                except UnknownTagError as exc:
                    log.warning("label %r maps to no classifier class and no trained head knows it; it will not "
                                "be predicted (%s). Add predicted_values=\"class a,class b\" to the "
                                "<Label>/<Choice>, or annotate photos with it so that training learns it.",
                                label, exc)
        return usable

    def predict_image(self, image, config: LabelConfig, human: list[str] | None, task_id=None) -> dict:
        """Prediction of one photo (RGB uint8): `human` tags when given (the task's annotation), else the
        config labels the classifier picks. Raises what the photo raised."""
        (out,) = self.predict_images([image], config, [human], [task_id])
        if isinstance(out, Exception):
            raise out
        return out

    def predict_images(self, images: list, config: LabelConfig, humans: list[list[str] | None],
                       task_ids: list | None = None, version: str | None = None) -> list[dict | Exception]:
        """Predictions of several photos in one engine call (``engine.predict_many``: photos batched
        for the device), under the inference lock. ``humans[i]``: photo i's annotated tags or None
        (the classifier picks). A photo that fails gives its Exception at its index; the rest go on.
        Annotated tags that cannot be segmented are left out of the photo's prediction and named in
        its ``"warnings"`` (:func:`backend.labelstudio.results.make_prediction`); when none can be, the photo
        fails. `version`: the version to report and serve the heads of (default: the model's; see
        the module docstring). What :func:`backend.serving.predict.predict_chunk` runs a chunk's Label
        Studio tasks through."""
        if not (len(images) == len(humans) == len(task_ids if task_ids is not None else images)):
            raise ValueError("predict_images needs as many tag lists and task ids as photos")
        task_ids = list(task_ids) if task_ids is not None else [None] * len(images)
        extra = {label: names for label, names in config.tag_queries().items() if names}
        engine, lock = get_engine(self.settings)
        version, heads = self._heads(version)
        out: list[dict | Exception | None] = [None] * len(images)
        with lock:
            engine.set_heads(heads)
            engine.tag_extra = extra or None
            usable = self._usable_labels(engine, config, extra)
            todo: list[tuple[int, list[str], dict[str, str]]] = []
            for i, (image, human) in enumerate(zip(images, humans)):
                try:
                    tags, skipped = self._tags_for(engine, image, usable, human)
                    todo.append((i, tags, skipped))
                    log.info("task %s: tags %s (from %s)", task_ids[i], tags,
                             "annotation" if human else "classifier")
                    for tag, reason in skipped.items():
                        log.warning("task %s: annotated tag %r left out: %s", task_ids[i], tag, reason)
                except Exception as exc:  # noqa: BLE001 - recorded per photo
                    out[i] = exc
            photos = engine.predict_many([images[i] for i, _, _ in todo], [tags for _, tags, _ in todo],
                                         batch_size=max(1, len(todo)))
        for (i, _, skipped), photo in zip(todo, photos):
            if not isinstance(photo, Exception):
                photo.skipped = {**skipped, **photo.skipped}
            out[i] = photo if isinstance(photo, Exception) else make_prediction(photo, config, version)
        return out

    def _tags_for(self, engine, image, usable: list[str], human: list[str] | None
                  ) -> tuple[list[str], dict[str, str]]:
        """(The tags to segment in one photo, {annotated tag left out: why}): the annotated ones among
        `usable` (the others are left out with their reason; none usable: ValueError naming every
        reason), else the `usable` labels whose score (``engine.choice_scores``: the ImageNet classifier's
        weighed by the project's label frequencies, or the project's classifier head's for its own
        labels) passes the threshold (at least the best one; :func:`explainers.tag_choice.choose_tags`)."""
        from backend.labelstudio.results import no_usable_tag_message

        if human:
            tags = [t for t in dict.fromkeys(human) if t in usable]
            skipped = {clip(t, MAX_ECHOED_TAG_CHARS): _unusable_reason(engine, t)
                       for t in dict.fromkeys(human) if t not in usable}
            if not tags:
                raise ValueError(no_usable_tag_message(skipped, "the task's annotated tags"))
            return tags, skipped
        if not usable:
            raise ValueError("no label of the labeling config maps to a classifier class or a trained head's label")
        scores = engine.choice_scores(image, usable)
        return choose_tags(scores, self.settings.threshold, self.settings.max_tags), {}

