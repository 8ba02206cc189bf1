"""Tag choice on untagged photos: precision and recall of the tags the backend picks, zero-shot and
after the project has learnt from its annotated photos.

The choice is the served one: ``engine.choice_scores`` over the project's labels (ImageNet's scores,
or the project's classifier head's for the labels it learnt present and absent, the others moved by
the project's label frequencies, :mod:`explainers.tag_choice`), then ``choose_tags`` at the threshold
and ``max_tags`` of the service (TAG2MASK_THRESHOLD 0.2, TAG2MASK_MAX_TAGS 3 unless given).
A project is trained as ``tag2mask train`` and Start training train it
(:func:`backend.training.trainer.train_and_register`) and loaded as ``tag2mask label --model-dir
--project`` loads it (:func:`backend.serving.offline.load_offline_heads`).

Sets:

- ``msrc``: a project whose labels are MSRC-v2's 23 classes, trained on the dev split's image-level
  tags (no mask), scored on the test split. Precision and recall are counted over the 16 object
  classes (a photo's true tags: the classes its mask holds) and over all 23. Zero-shot, only the
  labels ImageNet can name can be chosen. The threshold is chosen on the dev split: two halves, each
  trained on one and scored on the other (``--thresholds``).
- ``horse``: the Label Studio cycle of the issue, offline: labels horse and dog, 20 annotated photos
  of the Weizmann train split (tag and mask), then the tags chosen for the other train horses (dev)
  and for the 49 test horses: how many are tagged "horse" alone; and the guards, MSRC-v2's dogs
  (and cows, with the labels horse, dog, cow) in that project: how many keep their label. Beside
  "after": the same heads without the nearest annotated photo (:mod:`explainers.tag_neighbours`).
- ``weights``: the prior weight of :class:`~explainers.tag_choice.TagPrior` on the dev photos,
  ImageNet's scores only: MSRC dev in two halves (counts from one, tags chosen on the other, the
  ImageNet-named objects), and the 20-annotated train horses.

    TAG2MASK_THREADS=2 python benchmarks/tag_choice.py --sets msrc,horse,weights
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cli.evaluation import read_classes, read_photo_tags  # noqa: E402
from benchmarks.horses import HORSE_DIR, stems as horse_stems  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.imageio import load_image  # noqa: E402
from explainers.tag_choice import TagPrior, choose_tags, count_labels  # noqa: E402

MSRC = HORSE_DIR.parent / "msrc_v2"
OBJECTS = ("cow horse sheep aeroplane face car bicycle flower sign bird book chair cat dog body boat").split()


class Counts:
    """True / false positives and misses of chosen tags, over some labels."""

    def __init__(self, labels):
        self.labels, self.tp, self.fp, self.fn = set(labels), 0, 0, 0

    def add(self, chosen, truth) -> None:
        c, t = set(chosen) & self.labels, set(truth) & self.labels
        self.tp += len(c & t)
        self.fp += len(c - t)
        self.fn += len(t - c)

    @property
    def precision(self) -> float:
        return self.tp / max(1, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return self.tp / max(1, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return 2 * self.tp / max(1, 2 * self.tp + self.fp + self.fn)

    def __str__(self) -> str:
        return f"P {self.precision:.3f} R {self.recall:.3f} F1 {self.f1:.3f}"


def train_project(backbone, samples, model_dir: Path, project: str):
    """Train and promote as the service does (the heads learn the labels the photos carry); -> (the
    promoted ProjectHeads, the training report)."""
    from backend.serving.offline import load_offline_heads
    from backend.storage.registry import ModelRegistry
    from backend.training.trainer import train_and_register

    report = train_and_register(samples, project, ModelRegistry.in_model_dir(model_dir), backbone,
                                trigger="benchmark", force=True)
    return load_offline_heads(model_dir, project, backbone).heads, report


def msrc_photos():
    classes = read_classes(MSRC / "classes.txt")
    tags = read_photo_tags(MSRC / "tags.txt", classes)
    split = {name: (MSRC / f"split_{name}.txt").read_text().split() for name in ("dev", "test")}
    truth = {s: sorted(classes[v] for v in tags.get(s, [])) for s in split["dev"] + split["test"]}
    labels = [classes[k] for k in sorted(classes)]
    return labels, split, truth


def scores_of(engine, stems, labels, image_of) -> dict:
    return {s: engine.choice_scores(image_of(s), labels) for s in stems}


def choose_all(scores: dict, threshold: float, max_tags: int) -> dict:
    return {s: choose_tags(sc, threshold, max_tags) for s, sc in scores.items()}


def run_msrc(engine, args) -> None:
    from explainers.training import Sample

    labels, split, truth = msrc_photos()
    images = {}

    def image_of(s):
        if s not in images:
            images[s] = load_image(MSRC / "images" / f"{s}.png")
        return images[s]

    def sample(s):
        return Sample(f"msrc-{s}", list(truth[s]), image=image_of(s))

    thresholds = [float(t) for t in args.thresholds.split(",")]
    usable_zs = [t for t in labels if engine.knows_tag(t)]
    engine.set_heads(None)
    zs = scores_of(engine, split["dev"] + split["test"], usable_zs, image_of)

    # the threshold, on the dev split: each half trained on, the other scored
    dev = split["dev"]
    halves = [dev[0::2], dev[1::2]]
    learnt_dev = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (train, held) in enumerate([(halves[0], halves[1]), (halves[1], halves[0])]):
            heads, _ = train_project(engine.backbone, [sample(s) for s in train], Path(tmp), f"half{k}")
            engine.set_heads(heads)
            learnt_dev.update(scores_of(engine, held, labels, image_of))
        t = time.perf_counter()
        heads, report = train_project(engine.backbone, [sample(s) for s in dev], Path(tmp), "dev")
        train_s = time.perf_counter() - t
        engine.set_heads(heads)
        learnt = scores_of(engine, split["test"], labels, image_of)
    engine.set_heads(None)

    def counts(scores, stems, threshold):
        obj, every = Counts(OBJECTS), Counts(labels)
        for s, chosen in choose_all({s: scores[s] for s in stems}, threshold, args.max_tags).items():
            obj.add(chosen, truth[s])
            every.add(chosen, truth[s])
        return obj, every

    def pick(scores, stems):
        return max(thresholds, key=lambda th: counts(scores, stems, th)[0].f1)

    th_zs, th_learnt = pick(zs, dev), pick(learnt_dev, dev)
    print(f"\nMSRC-v2: {len(dev)} dev photos (tags only) -> {len(split['test'])} test photos; 23 labels, "
          f"{len(usable_zs)} of them ImageNet can name; max_tags {args.max_tags}; training on all dev "
          f"{train_s:.0f} s (validation map {report['validation'].get('map', float('nan')):.3f})")
    print(f"{'':34s}{'threshold':>10s}  {'objects (16), test':34s}{'all 23 classes, test':34s}objects, dev")
    for name, scores, dev_scores, th in [("zero-shot (ImageNet)", zs, zs, th_zs),
                                         ("learnt from the dev tags", learnt, learnt_dev, th_learnt)]:
        for label, threshold in ((f"{name}, threshold on dev", th), (f"{name}, service default", args.threshold)):
            obj, every = counts(scores, split["test"], threshold)
            obj_dev, _ = counts(dev_scores, dev, threshold)
            print(f"{label:34s}{threshold:10.2f}  {str(obj):34s}{str(every):34s}{obj_dev}")


def run_horse(engine, args) -> None:
    from benchmarks.horses import load
    from explainers.training import Sample

    labels = ["horse", "dog"]
    train = horse_stems("train")
    annotated, others, test = train[:20], train[20:], horse_stems("test")
    samples = []
    for s in annotated:
        img, gt = load(s)
        samples.append(Sample(f"horse-{s}", ["horse"], masks={"horse": gt}, image=img))

    def horse_only(stems):
        chosen = {s: choose_tags(engine.choice_scores(load(s)[0], labels), args.threshold, args.max_tags)
                  for s in stems}
        return sum(c == ["horse"] for c in chosen.values()), sum("dog" in c for c in chosen.values())

    _, split, truth = msrc_photos()
    guard_sets = {(part, label): [s for s in split[part] if label in truth[s]]
                  for part in ("dev", "test") for label in ("dog", "cow")}

    def guards():
        """Per MSRC set: how many photos keep their own label (dog; cow with the labels horse, dog, cow)."""
        kept = {}
        for (part, label), stems in guard_sets.items():
            project = labels if label == "dog" else [*labels, "cow"]
            kept[part, label] = sum(
                label in choose_tags(engine.choice_scores(load_image(MSRC / "images" / f"{s}.png"), project),
                                     args.threshold, args.max_tags) for s in stems)
        return kept

    engine.set_heads(None)
    before = {name: horse_only(st) for name, st in (("dev", others), ("test", test))}
    guard_before = guards()
    with tempfile.TemporaryDirectory() as tmp:
        heads, _ = train_project(engine.backbone, samples, Path(tmp), "horses")
        engine.set_heads(heads)
        after = {name: horse_only(st) for name, st in (("dev", others), ("test", test))}
        guard_after = guards()
        neighbours, heads.tag_neighbours = heads.tag_neighbours, None     # the prior alone, for comparison
        prior_only = {name: horse_only(st) for name, st in (("dev", others), ("test", test))}
        guard_prior = guards()
        heads.tag_neighbours = neighbours
    engine.set_heads(None)
    print(f"\nhorse + dog project, 20 annotated train horses (tag and mask), threshold {args.threshold}:")
    for name, st in (("other train horses (dev)", others), ("test horses", test)):
        key = "dev" if "dev" in name else "test"
        print(f"  {name:26s} {len(st):3d} photos: tagged 'horse' alone {before[key][0]:3d} before -> "
              f"{after[key][0]:3d} after (prior alone {prior_only[key][0]:3d}); 'dog' among the tags "
              f"{before[key][1]:3d} -> {after[key][1]:3d} (prior alone {prior_only[key][1]:3d})")
    print("  the guards (a label never annotated, with real evidence; cows with the labels horse, dog, cow):")
    for (part, label), stems in guard_sets.items():
        print(f"  MSRC-v2 {part} photos of {label:4s} {len(stems):3d}: keep their label "
              f"{guard_before[part, label]:3d} before -> {guard_after[part, label]:3d} after (prior alone "
              f"{guard_prior[part, label]:3d})")


def run_weights(engine, args) -> None:
    _, split, truth = msrc_photos()
    engine.set_heads(None)
    cover = [t for t in OBJECTS if engine.knows_tag(t)]
    dev = split["dev"]
    zs = {s: engine.tag_scores(load_image(MSRC / "images" / f"{s}.png"), cover) for s in dev}
    from benchmarks.horses import load

    others = horse_stems("train")[20:]
    hz = {s: engine.tag_scores(load(s)[0], ["horse", "dog"]) for s in others}
    print(f"\nprior weight on the dev photos (ImageNet scores; threshold {args.threshold}):")
    for w in [float(v) for v in args.weights.split(",")]:
        obj = Counts(cover)
        for train, held in [(dev[0::2], dev[1::2]), (dev[1::2], dev[0::2])]:
            prior = count_labels([[t for t in truth[s] if t in cover] for s in train], weight=w)
            for s in held:
                obj.add(choose_tags({t: prior.adjust(t, v) for t, v in zs[s].items()}, args.threshold,
                                    args.max_tags), truth[s])
        prior = TagPrior(20, {"horse": 20}, weight=w)
        ok = sum(choose_tags({t: prior.adjust(t, v) for t, v in hz[s].items()}, args.threshold, args.max_tags)
                 == ["horse"] for s in others)
        print(f"  weight {w:4.2f}: MSRC dev objects (two halves) {obj};  train horses tagged 'horse' alone "
              f"{ok}/{len(others)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="msrc,horse,weights")
    ap.add_argument("--threshold", type=float, default=0.2, help="the service's TAG2MASK_THRESHOLD")
    ap.add_argument("--max-tags", type=int, default=3, help="the service's TAG2MASK_MAX_TAGS")
    ap.add_argument("--thresholds", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7", help="candidates chosen from on dev")
    ap.add_argument("--weights", default="0,0.5,1,1.5", help="prior weights compared on dev (--sets weights)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    threads = set_cpu_threads(args.threads)
    from explainers.segment import PipelineConfig, Tag2Mask

    engine = Tag2Mask("efficientnet_lite0", PipelineConfig.preset("balanced"), device="cpu")
    print(f"threads {threads}")
    runs = {"msrc": run_msrc, "horse": run_horse, "weights": run_weights}
    for name in args.sets.split(","):
        if name not in runs:
            raise SystemExit(f"unknown set {name!r}; choose from {', '.join(runs)}")
        runs[name](engine, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
