"""Self-training in the product (issue 14, second part): a project's tagged photos teach its masks.

The ``train`` job with self-training on the machine's Redis (RQ's SimpleWorker in this process, its
progress in the job's meta and ``project_progress``), resuming a run whose worker died, a label with
too few photos kept zero-shot, and ``tag2mask label --self-train --project P --model-dir DIR``.
Real Weizmann horse photos, efficientnet_lite0 on the CPU; no mask is read for the pseudo-masks
(the corrected ones in the job test are corrections, and they win for their photos).
"""
from __future__ import annotations

import numpy as np
import pytest
from rq.job import Job

from conftest import horse_stems
from ls_payloads import annotation, brush_result, choices_result, horse_mask, webhook_body
from test_training_jobs import _run_train_queue, _store_webhooks, rconn, settings, shared_backbone  # noqa: F401

from backend.storage.registry import ModelRegistry

FAST = {"seg_epochs": 15, "clf_epochs": 100}


def _iou(engine, horse_dir, stems) -> float:
    """fg IoU pooled over the photos' pixels of the engine's "horse" masks."""
    from explainers.imageio import load_image

    inter = union = 0
    for s in stems:
        truth = horse_mask(horse_dir, s)
        (tag,) = engine.predict(load_image(horse_dir / "images" / f"{s}.jpg"), ["horse"]).tags
        inter += int((tag.mask & truth).sum())
        union += int((tag.mask | truth).sum())
    return inter / union


def _tag_samples(horse_dir, stems):
    from explainers.imageio import load_image
    from explainers.training import Sample

    return [Sample(f"h-{s}", ["horse"], load=lambda s=s: load_image(horse_dir / "images" / f"{s}.jpg"))
            for s in stems]


def test_train_job_self_trains_on_tagged_photos_with_progress_and_corrections_win(settings, horse_dir, rconn,
                                                                                 shared_backbone):
    """12 photos tagged "horse" (Choices only) and 3 with a corrected mask; TAG2MASK_SELF_TRAIN=8: the
    Start-training job pseudo-masks the 12 (not the 3), reports its progress, registers what it learnt
    from, and the served horse masks on 8 test horses beat the zero-shot ones."""
    from backend.queue.queues import project_progress
    from backend.serving.heads import load_project_heads
    from backend.training.schedule import enqueue_training
    from explainers.segment import PipelineConfig, Tag2Mask

    tagged, corrected = horse_stems("train")[:12], horse_stems("train")[12:15]
    bodies = []
    for i, s in enumerate(tagged + corrected):
        result = [choices_result("horse")] + ([brush_result(horse_mask(horse_dir, s))] if s in corrected else [])
        ann = annotation(3000 + i, 4000 + i, 61, result)
        bodies.append(webhook_body("ANNOTATION_CREATED", 61, ann, str(horse_dir / "images" / f"{s}.jpg")))
    _store_webhooks(bodies, settings)
    settings.self_train = 8
    queued = enqueue_training(rconn, "61", settings, trigger="manual", config=FAST)
    (report,) = _run_train_queue(rconn)
    assert queued["status"] == "queued" and report["status"] == "trained", report
    st = report["self_training"]
    assert st["photos"] == 12 and 8 <= st["used"] <= 12 and st["zero_shot"] == [] and st["from_version"] == "zero-shot"
    assert report["counts"]["train_pseudo_masks"] >= 1 and report["counts"]["train_with_masks"] >= 1
    meta = ModelRegistry.in_model_dir(settings.model_dir).meta("61", report["version"])
    assert meta["self_training"]["used"] == st["used"]
    ckpt, _ = ModelRegistry.in_model_dir(settings.model_dir).load("61")
    assert ckpt["head_cam"] == "unknown"      # labels ImageNet names keep its CAM in a self-trained version
    training = project_progress(rconn, "61")["training"]
    assert training == {"job": queued["job_id"], "status": "finished", "stage": "saving", "done": None,
                        "total": None}, training
    stages = Job.fetch(queued["job_id"], connection=rconn).meta["stages"]
    assert stages == [["pseudo-masks", 12, 12], ["training the heads", None, None], ["choosing the fusion", None, None],
                      ["refitting", None, None], ["saving", None, None]], stages
    assert not (settings.model_dir / "pseudo").exists() or not any((settings.model_dir / "pseudo").rglob("*.npz"))

    test = horse_stems("test")[:8]
    engine = Tag2Mask(shared_backbone, PipelineConfig.preset("balanced"))
    zero_shot = _iou(engine, horse_dir, test)
    engine.set_heads(load_project_heads(ModelRegistry.in_model_dir(settings.model_dir), "61", shared_backbone))
    trained = _iou(engine, horse_dir, test)
    print(f"\n8 test horses, fg IoU: zero-shot {zero_shot:.3f}, self-trained on 12 tagged + 3 corrected {trained:.3f}")
    assert trained > zero_shot + 0.01, (zero_shot, trained)


def test_a_run_whose_worker_died_resumes_from_the_photos_it_had_done(tmp_path, horse_dir, backbone):
    """Each photo's pseudo-mask is on disk as soon as it is made: a run stopped after 4 photos, run again,
    segments only the other 6, and gives the same targets as one run straight through."""
    from backend.training.self_training import pseudo_masks_for

    samples = _tag_samples(horse_dir, horse_stems("train")[:10])
    registry = ModelRegistry.in_model_dir(tmp_path / "a")

    class WorkerDied(Exception):
        pass

    def die_after_4(done, total):
        if done == 4:
            raise WorkerDied()

    with pytest.raises(WorkerDied):
        pseudo_masks_for(samples, "7", registry, backbone, ["horse"], 64, model_dir=tmp_path / "a", progress=die_after_4)
    assert len(list((tmp_path / "a" / "pseudo").rglob("*.npz"))) + len(list((tmp_path / "a" / "pseudo").rglob("*.none"))) == 4
    resumed, stats, store = pseudo_masks_for(samples, "7", registry, backbone, ["horse"], 64, model_dir=tmp_path / "a")
    assert (stats["resumed"], stats["computed"], stats["photos"]) == (4, 6, 10)
    straight, stats_b, _ = pseudo_masks_for(samples, "7", ModelRegistry.in_model_dir(tmp_path / "b"), backbone,
                                            ["horse"], 64, model_dir=tmp_path / "b")
    assert stats_b["computed"] == 10 and sorted(resumed) == sorted(straight)
    for key in straight:
        assert np.allclose(resumed[key][0], straight[key][0]) and np.allclose(resumed[key][1], straight[key][1])
    store.remove()
    assert not store.folder.exists()


def test_a_label_with_too_few_confident_photos_keeps_the_zero_shot_path(tmp_path, horse_dir, backbone):
    """10 horses and 2 photos also tagged "zebra" (a label ImageNet names): zebra has fewer than
    min_label_photos (8) pseudo-masks, so it learns nothing where it is and is served without the seg head."""
    from backend.training.trainer import train_and_register

    samples = _tag_samples(horse_dir, horse_stems("train")[:10])
    for s in samples[:2]:
        s.tags.append("zebra")
    report = train_and_register(samples, "8", ModelRegistry.in_model_dir(tmp_path), backbone, config=FAST,
                                self_train={}, model_dir=tmp_path)
    st = report["self_training"]
    assert st["zero_shot"] == ["zebra"] and st["per_label"]["horse"] >= 8, st
    assert report["fusion"]["zebra"] == {"weight": 0.0, "crf": True}
    assert report["fusion"].get("horse", {"weight": 0.7})["weight"] > 0


def test_label_self_train_into_a_project_registry_and_models_list(tmp_path, horse_dir, capsys):
    """``tag2mask label PHOTOS --tags horse --self-train --project P --model-dir DIR``: a new version
    trained on the photos' pseudo-masks, then the photos labelled with it (its model version)."""
    from backend.cli.main import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for s in horse_stems("test")[:12]:
        (photos / f"{s}.jpg").symlink_to(horse_dir / "images" / f"{s}.jpg")
    md = tmp_path / "md"
    rc = main(["label", str(photos), "--tags", "horse", "--out", str(tmp_path / "out"), "--self-train",
               "--project", "boot", "--model-dir", str(md), "--preset", "fast", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "self-training: project boot v1 on the pseudo-masks of" in captured.err
    assert "+pboot.v1" in captured.out
    meta = ModelRegistry.in_model_dir(md).meta("boot", "v1")
    assert meta["self_training"]["photos"] == 12 and meta["source"] == "tag2mask label --self-train"
    assert main(["models", "list", "--model-dir", str(md), "--project", "boot"]) == 0
    assert f" pseudo={meta['self_training']['used']}/12 " in capsys.readouterr().out
    # without --project: a temporary registry, the base version marked as self-trained
    rc = main(["label", str(photos / f"{horse_stems('test')[0]}.jpg"), str(photos / f"{horse_stems('test')[1]}.jpg"),
               "--tags", "horse", "--out", str(tmp_path / "out2"), "--self-train", "--preset", "fast", "-q"])
    assert rc == 0 and "+self-trained" in capsys.readouterr().out


def test_train_self_train_on_a_label_studio_export_of_choices_only_tasks(tmp_path, horse_dir, capsys):
    """``tag2mask train --ls-export --self-train``: 2 tasks with a corrected mask and 10 with Choices only;
    the 10 train the seg head on their pseudo-masks (without --self-train they would not)."""
    import json

    from backend.cli.main import main

    stems = horse_stems("train")[20:32]
    tasks = []
    for i, s in enumerate(stems):
        result = [choices_result("horse")] + ([brush_result(horse_mask(horse_dir, s))] if i < 2 else [])
        tasks.append({"id": 700 + i, "project": 9, "data": {"image": f"/data/local-files/?d=images/{s}.jpg"},
                      "annotations": [annotation(8000 + i, 700 + i, 9, result)]})
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    rc = main(["train", "--ls-export", str(export), "--images-root", str(horse_dir), "--self-train",
               "--model-dir", str(tmp_path / "md"), "--seg-epochs", "10", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "self-training: the seg head also learnt from the pseudo-masks of" in out and "of 10 tagged photo(s)" in out
    meta = ModelRegistry.in_model_dir(tmp_path / "md").meta("9", "v1")
    assert meta["self_training"]["photos"] == 10 and meta["counts"]["train_pseudo_masks"] >= 5


def test_a_label_imagenet_lacks_is_self_trained_from_tags_alone(tmp_path, horse_dir, backbone):
    """"Pony photo" (no ImageNet class) on 12 horses and "Other scene" on 8 other photos, Choices only:
    its pseudo-masks come from a classifier head trained first on the tags (its CAM), the seg head
    learns from them, and the served "Pony photo" masks on 6 test horses cover the horses."""
    from backend.serving.heads import load_project_heads
    from backend.training.trainer import train_and_register
    from explainers.segment import PipelineConfig, Tag2Mask
    from test_head_cam import _tag_samples as pony_samples

    registry = ModelRegistry.in_model_dir(tmp_path)
    report = train_and_register(pony_samples(horse_dir, "Pony photo", "Other scene"), "5", registry, backbone,
                                config=FAST, self_train={}, model_dir=tmp_path)
    st = report["self_training"]
    assert st["cam_from_tags"] == ["Other scene", "Pony photo"] and st["per_label"]["Pony photo"] >= 8, st
    assert report["counts"]["train_pseudo_masks"] >= 8
    engine = Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=load_project_heads(registry, "5", backbone))
    from explainers.imageio import load_image

    inter = union = 0
    for s in horse_stems("test")[:6]:
        truth = horse_mask(horse_dir, s)
        (tag,) = engine.predict(load_image(horse_dir / "images" / f"{s}.jpg"), ["Pony photo"]).tags
        inter, union = inter + int((tag.mask & truth).sum()), union + int((tag.mask | truth).sum())
    print(f"\n'Pony photo' self-trained from tags alone: fg IoU {inter / union:.3f} on 6 test horses")
    assert inter / union > 0.6


def test_the_resume_store_keeps_hostile_keys_inside_its_folder_and_skips_torn_files(tmp_path):
    """Sample keys come from Label Studio tasks: a key like '../../x' or 10 000 characters is hashed into
    a file name inside the run's folder; a torn .npz is computed again, not trusted."""
    from backend.training.self_training import PseudoStore

    store = PseudoStore(tmp_path / "run")
    keys = ["../../escape", "a" * 10_000, "/etc/passwd", "ok"]
    target, weight = np.ones((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.float32)
    for k in keys[:3]:
        store.save(k, ((target, weight), 0.9))
    store.save("ok", None)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert len(files) == 4 and all(len(name) < 40 for name in files)
    assert not any(p.parent != tmp_path / "run" for p in tmp_path.rglob("*.npz"))
    loaded = store.load(keys)
    assert loaded["ok"] is None and np.array_equal(loaded["../../escape"][0][0], target)
    torn = next((tmp_path / "run").glob("*.npz"))
    torn.write_bytes(b"not a zip")
    assert len(store.load(keys)) == 3
