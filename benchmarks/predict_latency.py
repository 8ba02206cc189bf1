"""Latency of one ``/predict`` through the real served backend: ``python -m backend.serve`` (gunicorn) on
a free port, one task per request, an 800 x 600 photo with one annotated tag, inline mode.

The photo is a coco128_dev photo (a zebra on grass by default) resized to 800 x 600 and written to a
temporary folder that the backend may read (``TAG2MASK_LOCAL_ROOTS``). The model is loaded and one
request is sent before the clock starts; then each request is timed from send to parsed answer
(fetch, CAM, CRF, masks, polygons, boxes, the brush RLE and the JSON included).

    python benchmarks/predict_latency.py --threads 2 --n 15 --preset balanced
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
  <RectangleLabels name="box" toName="image"><Label value="{tag}"/></RectangleLabels>
</View>"""


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
    args = ap.parse_args(argv)

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
            body = lambda i: {"tasks": [task(i)], "label_config": config, "project": "1"}  # noqa: E731
            requests.post(base + "/predict", json=body(0), timeout=100).raise_for_status()
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
    print(f"/predict, one 800x600 photo, tag {args.tag!r}, preset {args.preset}, {args.threads} thread(s), "
          f"{args.n} requests: p50 {statistics.median(times):.3f} s, min {min(times):.3f}, max {max(times):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
