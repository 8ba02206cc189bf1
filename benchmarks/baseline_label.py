"""The naive whole-process baseline of ``tag2mask label``: pytorch-grad-cam + pydensecrf at full resolution.

What a practitioner would write with the two well-known libraries: for every photo of a folder,
pytorch-grad-cam's ``GradCAM`` at 224 x 224 on the classifier's last conv layer for the tag's
ImageNet classes (log-sum-exp of their logits), the map upsampled to the photo, a two-label dense CRF
(pydensecrf: unary from the map, Gaussian sxy 3 / compat 3, bilateral sxy 80 / srgb 13 / compat 10,
5 iterations) at the photo's full resolution, and the mask written as a PNG. Same classifier and
weights as tag2mask (``explainers.backbones``, offline). Time it as a whole process against
``tag2mask label`` doing the same photos::

    python benchmarks/baseline_label.py --images DIR --tag horse --out OUT
    tag2mask label DIR --tags horse --out OUT2 -q
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="a folder of photos")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import cv2
    import numpy as np
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax
    from pytorch_grad_cam import GradCAM

    from explainers.backbones import load_backbone
    from explainers.device import set_cpu_threads
    from explainers.hooks import get_layer
    from explainers.imageio import load_image
    from explainers.tags import resolve_tag

    set_cpu_threads(args.threads)
    backbone = load_backbone("efficientnet_lite0", "cpu")
    classes = list(resolve_tag(args.tag).indices)

    class Target:
        def __call__(self, output):
            return output[..., classes].logsumexp(-1)

    cam = GradCAM(backbone.model, [get_layer(backbone.model, backbone.target_layers[0])])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for path in photos:
        img = load_image(path)
        h, w = img.shape[:2]
        x = backbone.to_tensor(img, 224).requires_grad_(True)
        heat = cv2.resize(cam(x, [Target()])[0].astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        probs = np.stack([1.0 - heat, heat]).clip(1e-5, 1.0 - 1e-5)
        crf = dcrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
        crf.addPairwiseGaussian(sxy=3, compat=3)
        crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.array(img, dtype=np.uint8, order="C"), compat=10)
        mask = np.argmax(np.array(crf.inference(5)).reshape(2, h, w), axis=0).astype(np.uint8) * 255
        cv2.imwrite(str(out / f"{path.stem}.png"), mask)
    print(f"{len(photos)} photos -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
