"""Latency of one ``/predict`` through the real served backend: ``python -m backend.serve`` (gunicorn) on
a free port, one task per request, an 800 x 600 photo with one annotated tag, inline mode.

The photo is a coco128_dev photo (a zebra on grass by default) resized to 800 x 600 and written to a
temporary folder that the backend may read (``TAG2MASK_LOCAL_ROOTS``). The model is loaded and one
request is sent (``--settle`` seconds after the load; its time is printed apart: what the first
annotator waits) before the clock starts; then each request is timed from send to parsed answer
(fetch, CAM, CRF, masks, polygons, boxes, the brush RLE and the JSON included).

    python benchmarks/predict_latency.py --threads 2 --n 15 --preset balanced
    python benchmarks/predict_latency.py --smart box      # a smart tool's box around the object (params.context)
    python benchmarks/predict_latency.py --smart click    # one positive click on it
    python benchmarks/predict_latency.py --smart box --settle 10 --n 3   # the first box, 10 s after the load

``--smart``: the request carries Label Studio's interactive context, as the labeling UI sends it for a
smart RectangleLabels box (the tag's largest object in the photo's class-id mask, its box grown by 5 %)
or a smart KeyPointLabels click (that object's innermost pixel); the answer is its brush and polygon.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco128_dev"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="tag" toName="image" choice="multiple"><Choice value="{tag}"/></Choices>
  <BrushLabels name="brush" toName="image"><Label value="{tag}"/></BrushLabels>
  <PolygonLabels name="polygon" toName="image"><Label value="{tag}"/></PolygonLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="{tag}"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="{tag}" smart="true"/></KeyPointLabels>
</View>"""


def _smart_context(kind: str, photo: str, tag: str) -> dict:
    """The context of a smart box or click on the tag's largest object (percent of the photo)."""
    import cv2
    import numpy as np
    from PIL import Image

    classes = dict(line.split(None, 1) for line in (COCO / "classes.txt").read_text().splitlines() if line.strip())
    cid = next(int(k) for k, v in classes.items() if v.strip() == tag)
    gt = np.asarray(Image.open(COCO / "masks" / (Path(photo).stem + ".png"))) == cid
    n, comp, stats, _ = cv2.connectedComponentsWithStats(gt.astype(np.uint8), connectivity=8)
    obj = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    h, w = obj.shape
    if kind == "click":
        dist = cv2.distanceTransform(np.pad(obj, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        return {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                            "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 0.6, "keypointlabels": [tag]}}]}
    ys, xs = np.nonzero(obj)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    dx, dy = 0.025 * (x1 - x0), 0.025 * (y1 - y0)
    x0, y0, x1, y1 = max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)
    return {"result": [{"type": "rectanglelabels", "from_name": "box", "to_name": "image",
                        "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                                  "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [tag]}}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    import cv2
    import requests

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", default="000000000034.jpg", help="a coco128_dev image name")
    ap.add_argument("--tag", default="zebra")
    ap.add_argument("--n", type=int, default=15, help="timed requests")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads of the served process")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--smart", choices=("box", "click"), default=None,
                    help="send a smart tool's box or click (Label Studio's interactive context)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds between the model's load and the first request (an annotator opening a task)")
    args = ap.parse_args(argv)
    context = _smart_context(args.smart, args.photo, args.tag) if args.smart else None

    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        photo = Path(tmp) / "photo.jpg"
        cv2.imwrite(str(photo), cv2.resize(cv2.imread(str(COCO / "images" / args.photo)), (800, 600)))
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TAG2MASK_", "LABEL_STUDIO_", "REDIS_URL"))}
        env.update(MODEL_DIR=str(Path(tmp) / "model_dir"), TAG2MASK_LOCAL_ROOTS=tmp, TAG2MASK_QUEUE="off",
                   TAG2MASK_THREADS=str(args.threads), TAG2MASK_PRESET=args.preset, LOG_LEVEL="WARNING",
                   PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "backend.serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=tmp, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        config = CONFIG.format(tag=args.tag)

        def task(i: int) -> dict:
            choice = {"from_name": "tag", "to_name": "image", "type": "choices", "value": {"choices": [args.tag]}}
            return {"id": i, "data": {"image": str(photo)}, "annotations": [{"id": i, "result": [choice]}]}

        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    if requests.get(base + "/health", timeout=2).json().get("model_loaded"):
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.2)
            requests.post(base + "/setup", json={"project": "1", "schema": config}, timeout=10)
            body = lambda i: {"tasks": [task(i)], "label_config": config, "project": "1",  # noqa: E731
                              "params": {"context": context}}
            time.sleep(args.settle)
            t = time.perf_counter()
            requests.post(base + "/predict", json=body(0), timeout=100).raise_for_status()
            first = time.perf_counter() - t
            times = []
            for i in range(1, args.n + 1):
                t = time.perf_counter()
                reply = requests.post(base + "/predict", json=body(i), timeout=100).json()
                times.append(time.perf_counter() - t)
                if not reply["results"][0].get("result"):
                    raise SystemExit(f"no result: {reply}")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print(f"/predict{' (smart ' + args.smart + ')' if args.smart else ''}, one 800x600 photo, tag {args.tag!r}, "
          f"preset {args.preset}, {args.threads} thread(s), "
          f"{args.n} requests: p50 {statistics.median(times):.3f} s, min {min(times):.3f}, max {max(times):.3f}; "
          f"the first request ({args.settle:g} s after the model loaded, not in the p50): {first:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
