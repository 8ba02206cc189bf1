"""The training job (queue ``train``): a project's stored examples -> trained heads -> a registry version.

:func:`train_project` holds a per-project Redis lock (renewed while it runs), reads the examples
(photos through backend.labelstudio.photos), and calls :func:`train_and_register`, the core shared with
``tag2mask train``: train the heads on the hash split's train part
(:func:`explainers.training.train_heads`), choose per label how they combine with the CAM and the CRF
on the validation masks, scored as served (:func:`tune_fusion`), refit them on every example, save a
version, promote it unless validation regresses (the decision goes into its ``meta.json``), and
publish the promoted checkpoint to Redis (backend.storage.model_mirror). The backbone is the
process's (backend.serving.engine): one per process and device, shared with prediction jobs.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import fields
from typing import Sequence

from backend.serving.engine import engine_on, get_backbone
from backend.settings import Settings
from backend.storage.connection import current_connection
from backend.storage.examples import ExampleStore, example_store
from backend.storage.keys import train_lock_key
from backend.storage.model_mirror import RedisModelStore
from backend.storage.registry import ModelRegistry
from backend.training.options import settings_from_options
from backend.training.schedule import last_trained_revision

log = logging.getLogger(__name__)


LOCK_TTL = 600                 # seconds the project lock outlives a dead trainer (renewed every ttl/3 while it runs)


# -- training ----------------------------------------------------------------------------------------
def samples_from_store(store: ExampleStore, project, settings: Settings, fetcher=None) -> list:
    """The project's examples as :class:`explainers.training.Sample` (photos fetched lazily)."""
    from backend.labelstudio.photos import ImageFetcher

    fetcher = fetcher or ImageFetcher(settings)
    samples = []
    for ex in store.list(project):
        def load(ex=ex):
            return fetcher.load(ex.image, task_id=ex.task_id)
        samples.append(ex.to_sample(load=load))
    return samples


def _train_config(overrides: dict | None):
    from explainers.training import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(overrides or {}) - names)
    if bad:
        raise ValueError(f"unknown training option(s) {bad}; known: {sorted(names)}")
    return TrainConfig(**(overrides or {}))


def _record_promotion(registry: ModelRegistry, project, version: str, promotion, trigger: str) -> None:
    """Write the promotion decision into the version's meta.json (atomic replace)."""
    path = registry.project_dir(project) / version / "meta.json"
    meta = json.loads(path.read_text())
    meta["promotion"] = {"promoted": bool(promotion.promoted), "reason": promotion.reason,
                         "previous": promotion.previous, "regressions": promotion.regressions,
                         "trigger": trigger}
    tmp = path.with_name(f".meta.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, path)


def tune_fusion(result, samples: Sequence, backbone, preset: str = "balanced") -> dict | None:
    """Choose, per label, how the parts of a :class:`~explainers.training.TrainResult` combine in the
    pipeline of `preset` (seg head weight x CRF on/off; the CAM the engine serves for the tag, the
    classifier head's for labels ImageNet cannot name) on its validation samples that have masks
    (:func:`explainers.segment.fusion_tuning.choose_fusion`); set ``result.fusion`` (per label) and
    ``result.fusion_weight`` (the best over all labels) and return the choice for the version's meta
    (``validation["fusion"]``), with ``validation["pipeline_fg_iou"]`` = the served pipeline's
    validation score. Without enough validation masks the weight is
    :func:`~explainers.segment.fusion_tuning.fallback_weight`'s (box-only heads: 0.25; else None,
    the engine's default), with ``"rule"`` saying so. None when there is no seg head, or no
    validation mask and no fallback; ``{"error": ...}`` when the choice failed (logged; the training
    is kept with the default weight)."""
    if result.segmenter is None:
        return None
    from explainers.segment.fusion_tuning import Combo, choose_fusion, fallback_weight

    val_keys = set(result.val_keys)
    val = [s for s in samples if str(s.key) in val_keys and s.masks]
    meta = choice = engine = None
    if val:
        from explainers.training import ProjectHeads

        try:
            engine, lock = engine_on(backbone, preset)     # the process's engine: no second model on the device
            heads = ProjectHeads(backbone, result.classifier, result.segmenter, result.layers, result.size,
                                 head_cam=result.head_cam)
            with lock:                                     # it sets the heads it scores, then restores them
                extra, engine.tag_extra = engine.tag_extra, None   # a prediction's config labels are not ours
                try:
                    choice = choose_fusion(engine, heads, val)
                finally:
                    engine.tag_extra = extra
        except Exception as exc:   # noqa: BLE001 - the heads are still good; serve them at the default weight
            log.warning("fusion not chosen (%s: %s); the default stays", type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        result.fusion_weight = choice.weight
        result.fusion = choice.fusion
        result.seconds["fusion_tuning"] = choice.seconds
        meta = choice.to_meta()
    fallback = fallback_weight(result.counts)
    if result.fusion_weight is None and fallback is not None:
        result.fusion_weight = fallback
        meta = {**(meta or {}), "chosen": fallback, "rule": "seg head trained on boxes only"}
    if choice is not None and choice.scores:
        # what will be served on validation: the chosen per-label mix, else the pipeline at the weight
        # the heads carry (or the preset's) with its CRF; the registry compares this score between
        # versions before promoting (PROMOTION_METRICS)
        served_weight = result.fusion_weight if result.fusion_weight is not None else engine.fusion_weight()
        served = choice.served if choice.served is not None else \
            choice.score_of(Combo(float(served_weight), bool(engine.config.crf.enabled)))
        if served is not None:
            result.validation["pipeline_fg_iou"] = served
            meta["served_weight"] = float(served_weight)
            meta["served"] = served
    return meta


def train_and_register(samples: Sequence, project, registry: ModelRegistry, backbone, *, labels=None,
                       config: dict | None = None, examples_revision: int | None = None, promote: bool = True,
                       force: bool = False, tolerance: float = 0.0, trigger: str = "manual",
                       extra_meta: dict | None = None, preset: str = "balanced", self_train: dict | None = None,
                       model_dir=None, progress=None, stage=None) -> dict:
    """Train heads on `samples` (the hash split's train part), choose per label how they combine
    in the pipeline on the validation masks (:func:`tune_fusion`, the pipeline of `preset`), refit
    them on every example with that choice (:func:`explainers.training.refit_heads`,
    ``TrainConfig.refit``), save a registry version, promote it unless validation regresses.

    Returns ``{"project", "version", "promoted", "reason", "previous", "current", "validation",
    "counts", "seconds", "labels", "fusion_weight", "fusion"}`` (``fusion_weight`` None: the engine's
    default; ``fusion``: {label: {"weight", "crf"}}; the per-combination scores are in
    ``validation["fusion"]``; ``counts``: ``train`` / ``val`` (what the scores were validated on),
    ``refit`` (the examples the saved heads were trained on at last)). A refused promotion is
    logged (warning) and recorded in the version's ``meta.json`` (``"promotion"``) and in the
    registry's state log.

    `self_train` (a dict of SelfTrainConfig overrides, ``{}`` for the defaults; None: off): the samples
    with tags and no mask or box also train the seg head, on pseudo-masks from the project's pipeline
    as served now (:mod:`backend.training.self_training`; kept under `model_dir` so a retried job
    resumes). A label with too few confident pseudo-masked photos (and no corrected mask) keeps the
    zero-shot path: its fusion weight is set to 0. The report and the meta get ``"self_training"``
    (photos, used, per label, zero-shot labels, seconds). `progress(done, total)`: per pseudo-masked photo;
    `stage(name)`: when each later stage starts ("training the heads", "choosing the fusion", "refitting",
    "saving"), so a long job says what it is doing.
    """
    stage = stage or (lambda name: None)
    from explainers.heads import BackboneFeatures
    from explainers.training import FeatureCache, refit_heads, train_heads

    cfg = _train_config(config)
    samples = list(samples)
    pseudo = store = st_stats = None
    cache = FeatureCache(BackboneFeatures(backbone), cfg.size, cfg.flip, cfg.extract_batch)
    if self_train is not None:
        from backend.training.self_training import pseudo_masks_for

        if labels is None:
            labels = sorted({t for s in samples for t in s.all_tags()})
        pseudo, st_stats, store = pseudo_masks_for(samples, project, registry, backbone, labels,
                                                   cfg.size // cfg.target_stride, preset=preset, options=self_train,
                                                   model_dir=model_dir, progress=progress, cache=cache)
    stage("training the heads")
    result = train_heads(backbone, samples, labels=labels, config=cfg, cache=cache, pseudo_targets=pseudo)
    if st_stats is not None:
        # its classifier head learnt from tags alone: served, its CAM replaced ImageNet's for the labels
        # ImageNet names and lost (coco128_dev self-trained 0.179 against 0.247 zero-shot; 0.247 with
        # "unknown"); those keep ImageNet's CAM, the labels ImageNet lacks take the head's
        result.head_cam = "unknown"
    stage("choosing the fusion")
    fusion = tune_fusion(result, samples, backbone, preset)
    if fusion is not None:
        result.validation["fusion"] = fusion
    stage("refitting")
    result = refit_heads(backbone, result, samples, cfg, cache, pseudo_targets=pseudo)
    if st_stats is not None:
        masked = {t for s in samples for t in (*s.masks, *s.boxes)}
        for label in st_stats["zero_shot"]:
            if label not in masked and result.segmenter is not None:
                result.fusion[label] = {"weight": 0.0, "crf": True}     # served as before: CAM alone
    extra = dict(extra_meta or {})
    if st_stats is not None:
        extra["self_training"] = st_stats
    extra["trigger"] = trigger
    if examples_revision is not None:
        extra["examples_revision"] = int(examples_revision)
    stage("saving")
    version = registry.save_result(project, result, **extra)
    if store is not None:
        store.remove()                   # saved: a retry has nothing to resume
    out = {"project": str(project), "version": version, "validation": result.validation,
           "counts": result.counts, "seconds": result.seconds, "labels": list(result.labels),
           "fusion_weight": result.fusion_weight, "fusion": dict(result.fusion),
           "promoted": False, "reason": "not promoted (--no-promote)", "previous": registry.current(project)}
    if st_stats is not None:
        out["self_training"] = st_stats
    if promote:
        p = registry.promote(project, version, force=force, tolerance=tolerance)
        _record_promotion(registry, project, version, p, trigger)
        out.update(promoted=p.promoted, reason=p.reason, previous=p.previous, regressions=p.regressions)
        if p.promoted:
            log.info("project %s: %s promoted (%s)", project, version, p.reason)
        else:
            log.warning("project %s: %s NOT promoted: %s", project, version, p.reason)
    out["current"] = registry.current(project)
    return out


class _RenewingLock:
    """A Redis lock held while a training runs, its TTL renewed in a thread (dies with the worker)."""

    def __init__(self, conn, key: str, ttl: int = LOCK_TTL):
        self.lock = conn.lock(key, timeout=ttl, blocking=False, thread_local=False)
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.lock.acquire(blocking=False):
            return False
        self._thread = threading.Thread(target=self._renew, name="train-lock", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 3)):
            try:
                self.lock.extend(self.ttl, replace_ttl=True)
            except Exception as exc:   # noqa: BLE001 - Redis blip: next round tries again
                log.warning("could not renew the training lock: %s", exc)

    def release(self) -> None:
        self._stop.set()
        try:
            self.lock.release()
        except Exception:   # noqa: BLE001 - expired or Redis gone
            pass


def _self_train_option(options: dict, samples: Sequence) -> dict | None:
    """The job's self-training overrides, or None: ``options["self_train"]`` (a dict; ``true`` = the
    defaults) runs it; else ``options["self_train_min"]`` (TAG2MASK_SELF_TRAIN) runs it when the
    project has at least that many examples with tags and no mask or box."""
    value = options.get("self_train")
    if value is not None and value is not False:
        return dict(value) if isinstance(value, dict) else {}
    floor = int(options.get("self_train_min") or 0)
    tags_only = sum(1 for s in samples if s.tags and not s.has_regions)
    return {} if floor > 0 and tags_only >= floor else None


def _save_meta(job) -> None:
    """Save the RQ job's meta; progress is a courtesy, so a failure is logged and the training goes on."""
    try:
        job.save_meta()
    except Exception as exc:   # noqa: BLE001 - progress is a courtesy; the training goes on
        log.debug("progress not saved: %s", exc)


def _job_progress(job, stage: str):
    """A progress(done, total) that keeps the RQ job's meta current (every 5 photos and the last)."""
    if job is None:
        return None

    def report(done: int, total: int) -> None:
        if done % 5 and done != total:
            return
        job.meta.update({"stage": stage, "done": int(done), "total": int(total)})
        _save_meta(job)
    return report


def _job_stage(job):
    """A stage(name) that records the stage the RQ job has reached in its meta (photo counts cleared; the
    pseudo-masks' counts stay in ``stages``: [[name, done, total], ...])."""
    if job is None:
        return None

    def report(name: str) -> None:
        stages = list(job.meta.get("stages") or [])
        if job.meta.get("stage") and not stages:
            stages.append([job.meta["stage"], job.meta.get("done"), job.meta.get("total")])
        stages.append([name, None, None])
        job.meta.update({"stage": name, "done": None, "total": None, "stages": stages})
        _save_meta(job)
    return report


def train_project(project, options: dict | None = None, connection=None) -> dict:
    """The training job: train `project`'s heads on its stored examples and register the result.

    `options` (JSON-able): ``model_dir``, ``local_roots``, ``backbone``, ``label_studio_url``
    (override the environment's settings), ``config`` (TrainConfig fields), ``force`` (promote even
    if validation regresses), ``trigger``, ``min_examples`` (default 2), ``self_train`` /
    ``self_train_min`` (:func:`_self_train_option`; the job's meta then counts the pseudo-masked photos,
    ``stage``, ``done``, ``total``). `connection` defaults to the current RQ job's. Returns the :func:`train_and_register` report plus ``status`` "trained", or
    ``{"status": "skipped", "reason"}`` (another training of the project holds the lock, too few
    examples, nothing changed since the newest model).
    """
    from rq import get_current_job

    options = dict(options or {})
    settings = settings_from_options(options)
    job = get_current_job()
    conn = connection if connection is not None else current_connection()
    lock = _RenewingLock(conn, train_lock_key(project))
    if not lock.acquire():
        log.info("project %s: another training holds the lock; skipped", project)
        return {"status": "skipped", "project": str(project), "reason": "another training of this project is running"}
    try:
        store = example_store(settings)
        registry = ModelRegistry.in_model_dir(settings.model_dir)
        rev = store.revision(project)
        if options.get("trigger") != "manual" and registry.versions(project) and \
                last_trained_revision(registry, project) >= rev:
            return {"status": "skipped", "project": str(project), "revision": rev,
                    "reason": "no example changed since the newest model"}
        samples = samples_from_store(store, project, settings)
        min_examples = int(options.get("min_examples", 2))
        if len(samples) < min_examples:
            return {"status": "skipped", "project": str(project), "revision": rev,
                    "reason": f"{len(samples)} example(s); at least {min_examples} are needed"}
        backbone = get_backbone(settings.backbone, settings=settings)
        t = time.perf_counter()
        self_train = _self_train_option(options, samples)
        report = train_and_register(samples, project, registry, backbone, config=options.get("config"),
                                    examples_revision=rev, force=bool(options.get("force")),
                                    trigger=str(options.get("trigger") or "auto"),
                                    extra_meta={"device": str(backbone.device), "preset": settings.preset},
                                    preset=settings.preset, self_train=self_train, model_dir=settings.model_dir,
                                    progress=_job_progress(job, "pseudo-masks"), stage=_job_stage(job))
        report.update(status="trained", revision=rev, wall_seconds=round(time.perf_counter() - t, 2))
        try:
            report["published"] = RedisModelStore(conn).publish(registry, project)
        except Exception as exc:   # noqa: BLE001 - the scheduler's sync publishes it later
            log.warning("project %s: could not publish the model to Redis: %s", project, exc)
        if job is not None:
            job.meta.update({"version": report["version"], "promoted": report["promoted"]})
            job.save_meta()
        return report
    finally:
        lock.release()
