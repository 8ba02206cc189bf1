"""The trainable heads on the real efficientnet_lite0: features, saving, learning a label ImageNet
lacks from a few photos, and a seg head learning horse masks from a few real masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from explainers.errors import UnknownTagError
from explainers.heads import BackboneFeatures, ClassifierHead, SegHead
from explainers.segment.fusion import fuse_seg
from explainers.tags import resolve_tag
from explainers.training import ProjectHeads, Sample, TrainConfig, fg_iou_scores, train_heads
from tests.conftest import horse_and_mask as _horse
from tests.conftest import horse_stems
from tests.conftest import rgb_uint8 as _rgb
from tests.conftest import spread_names as _spread


@pytest.fixture(scope="module")
def feats(backbone):
    return BackboneFeatures(backbone)


def test_features_are_the_backbones_own(backbone, feats, horse_photo):
    img, _ = horse_photo
    x = backbone.to_tensor(img, 256)
    pooled, maps = feats(x)
    with torch.no_grad():
        ref = backbone.model.forward_head(backbone.model.forward_features(x), pre_logits=True)
    assert torch.allclose(pooled, ref, atol=1e-4)      # what the ImageNet classifier reads
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8)]   # strides 8, 16, 32
    assert [m.shape[1] for m in maps] == feats.channels and feats.pooled_channels == 1280
    assert all(not m.requires_grad for m in maps)


def test_heads_save_only_their_own_parameters_and_round_trip(backbone, feats, horse_photo, tmp_path):
    clf = ClassifierHead(feats.pooled_channels, ["pony-photo", "kitchen"])
    seg = SegHead(feats.channels, ["horse", "rider"])
    torch.nn.init.normal_(clf.linear.weight)
    backbone_keys = set(backbone.model.state_dict())
    for head in (clf, seg):
        sd = head.state_dict()
        assert not backbone_keys & set(sd)
        assert sum(v.numel() for v in sd.values()) < 500_000      # light: not a copy of the backbone
    torch.save({"spec": seg.spec(), "state": seg.state_dict(), "clf_spec": clf.spec(), "clf": clf.state_dict()},
               tmp_path / "h.pt")
    ck = torch.load(tmp_path / "h.pt", weights_only=True)
    seg2, clf2 = SegHead.from_spec(ck["spec"]), ClassifierHead.from_spec(ck["clf_spec"])
    seg2.load_state_dict(ck["state"])
    clf2.load_state_dict(ck["clf"])
    img, _ = horse_photo
    pooled, maps = feats(backbone.to_tensor(img, 256))
    assert torch.equal(seg.eval()(maps, size=(100, 120)), seg2.eval()(maps, size=(100, 120)))
    assert seg2(maps, size=(100, 120)).shape == (1, 2, 100, 120)
    assert torch.equal(clf.eval()(pooled), clf2.eval()(pooled))
    with pytest.raises(ValueError):
        SegHead(feats.channels, ["a", "a"])


def test_fuse_seg_blends_the_seg_head_into_the_cam():
    """The pipeline's blend of a seg head into the CAM's class probabilities (background, then the
    tags): weight 0 keeps the CAM, 1 gives the seg head, in between a linear mix per pixel."""
    cam = np.full((40, 60), 0.1, np.float32)
    cam[10:30, 20:40] = 0.9
    unary = np.stack([1.0 - cam, cam])                        # background, horse
    seg = {"horse": np.full((40, 60), 0.5, np.float32)}
    assert np.allclose(fuse_seg(unary, ["horse"], seg, 0.0), unary, atol=1e-6)
    assert np.allclose(fuse_seg(unary, ["horse"], seg, 1.0)[1], 0.5, atol=1e-6)
    mixed = fuse_seg(unary, ["horse"], seg, 0.25)
    assert mixed.shape == unary.shape and mixed.dtype == np.float32
    assert np.isclose(mixed[1, 20, 30], 0.75 * 0.9 + 0.25 * 0.5) and np.isclose(mixed[1, 0, 0], 0.75 * 0.1 + 0.25 * 0.5)
    assert np.allclose(mixed.sum(axis=0), 1.0, atol=1e-6)
    two = fuse_seg(np.stack([1.0 - cam, cam / 2, cam / 2]), ["horse", "dog"],
                   {"horse": np.ones((40, 60), np.float32), "dog": np.ones((40, 60), np.float32)}, 0.5)
    assert two.shape == (3, 40, 60) and float(two[1:].min()) >= 0.25   # each tag: half the head's share
    assert np.array_equal(fuse_seg(unary, ["horse"], seg, 1.5), fuse_seg(unary, ["horse"], seg, 1.0))  # clipped
    with pytest.raises(ValueError):
        fuse_seg(unary, ["horse"], seg, 0.5, mode="max")


def test_classifier_head_learns_labels_imagenet_lacks(backbone, horse_dir):
    labels = ["pony-photo", "other-scene"]
    for label in labels:                       # the pretrained classifier cannot name these
        with pytest.raises(UnknownTagError):
            resolve_tag(label, backbone.categories)
    horses_train = _spread(horse_stems("train"), 12)
    horses_test = _spread(horse_stems("test"), 8)
    others_train = [data.astronaut(), data.coffee(), data.rocket(), data.hubble_deep_field(),
                    data.immunohistochemistry(), data.camera(), data.brick(), data.text()]
    others_test = [data.chelsea(), data.stereo_motorcycle(), data.retina(), data.coins(), data.grass(),
                   data.clock()]
    train = [Sample(f"h{i}", ["pony-photo"], image=_horse(horse_dir, s)[0]) for i, s in enumerate(horses_train)]
    train += [Sample(f"o{i}", ["other-scene"], image=_rgb(x)) for i, x in enumerate(others_train)]
    result = train_heads(backbone, train, labels, TrainConfig(size=224, seed=0), train_seg_head=False)
    assert result.segmenter is None and result.counts["val"] >= 1
    heads = ProjectHeads.from_checkpoint(result.checkpoint(), backbone)

    pos = [heads.tag_probs(_horse(horse_dir, s)[0]) for s in horses_test]
    neg = [heads.tag_probs(_rgb(x)) for x in others_test]
    pos_ok = sum(p["pony-photo"] > 0.5 and p["other-scene"] < 0.5 for p in pos)
    neg_ok = sum(p["pony-photo"] < 0.5 and p["other-scene"] > 0.5 for p in neg)
    assert pos_ok >= 7, pos           # of 8 held-out horse photos
    assert neg_ok >= 5, neg           # of 6 held-out other photos
    # ranking: every held-out horse scores above every held-out other photo
    assert min(p["pony-photo"] for p in pos) > max(p["pony-photo"] for p in neg)


@pytest.fixture(scope="module")
def horse_sets(horse_dir):
    train = [_horse(horse_dir, s) for s in _spread(horse_stems("train"), 16)]
    test = [_horse(horse_dir, s) for s in _spread(horse_stems("test"), 8)]
    return train, test


def test_seg_head_learns_horse_masks_from_16_real_masks(backbone, horse_sets):
    train, test = horse_sets
    samples = [Sample(f"t{i}", ["horse"], masks={"horse": m}, image=img) for i, (img, m) in enumerate(train)]
    cfg = TrainConfig(size=192, seg_epochs=25, seed=0)
    result = train_heads(backbone, samples, ["horse"], cfg, train_classifier_head=False,
                         validation=[])                    # all 16 train; scored on the test photos below
    heads = ProjectHeads(backbone, None, result.segmenter, result.layers, result.size)
    trained = fg_iou_scores([("horse", heads.seg_probs(img)["horse"] >= 0.5, m) for img, m in test])["fg_iou"]

    torch.manual_seed(0)
    untrained_head = ProjectHeads(backbone, None, SegHead(heads.features.channels, ["horse"]), result.layers, 192)
    untrained = fg_iou_scores([("horse", untrained_head.seg_probs(img)["horse"] >= 0.5, m) for img, m in test])["fg_iou"]
    # floor: "the whole photo is horse" scores the horses' area share (0.29 on these 8 photos) and the
    # exact box around each horse filled in scores 0.40 (Weizmann horses fill the frame), so 0.6 needs
    # real shape; measured: 0.81 trained vs 0.29 untrained (seed 0, 1 CPU thread).
    whole = fg_iou_scores([("horse", np.ones_like(m), m) for _, m in test])["fg_iou"]
    assert trained > untrained + 0.25, (trained, untrained)
    assert trained > max(0.6, whole + 0.3), (trained, whole)
