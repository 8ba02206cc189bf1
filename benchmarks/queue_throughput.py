"""Job queue throughput: N real photos through the queue with 1 and 2 workers vs the engine inline,
for several worker batch sizes (photos per engine call).

Every mode does the same work per photo: a Label Studio-style task (photo read through
ImageFetcher, tags chosen by the classifier, mask/polygons/boxes as Label Studio results) through
backend.serving.predict.predict_chunk, with no result-cache hits (a fresh model version per run).

* inline, batch B: predict_chunk over chunks of B tasks in this process (the model loaded and warmed
  up beforehand);
* queue, K workers, batch B: K ``python -m backend.worker --preload --batch-size B`` processes
  (started and model-loaded before the clock starts, one warm-up job each); the N tasks enqueued at
  once on the ``batch`` queue in jobs of ``--chunk`` tasks (as /predict's batch mode does, default 8);
  the run ends when the last job has finished.

Reported per mode: photos/s, per-task latency p50/p95 (inline: its chunk's call; queue: its job
enqueued -> ended, so it includes waiting behind the rest of the batch) and the service time p50 per
task (inline: the chunk's call / B; queue: job started -> ended / tasks of the job). Overhead per
task vs inline of the same batch size = K * wall / N - inline mean per task (the extra cost of a task
going through Redis and a worker, on the same cores; noisy on a busy machine). The queue-only cost
per task: the same jobs run again, every prediction a result-cache hit (K * wall / N): enqueue,
dequeue, photo read + hash, cache lookup, result storage, without the engine.

    TAG2MASK_THREADS=1 python benchmarks/queue_throughput.py --limit 40 --preset fast --batch-size 1 8
    REDIS_URL=redis://127.0.0.1:6379/11 python benchmarks/queue_throughput.py   # the machine's Redis

Without REDIS_URL an embedded Valkey is started in a temporary folder and stopped at the end.
Each worker gets ``TAG2MASK_THREADS`` (default 1) torch threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR", REPO.parent / "shared" / "data" / "weizmann_horse")).resolve()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def photos(limit: int) -> list[Path]:
    files = sorted((HORSE_DIR / "images").glob("*.jpg"))
    if not files:
        raise SystemExit(f"no photos in {HORSE_DIR / 'images'} (set TAG2MASK_HORSE_DIR)")
    return [files[i % len(files)] for i in range(limit)]


def ls_tasks(paths: list[Path], run: str) -> list[dict]:
    return [{"id": i + 1, "image": str(p), "tags": [], "ls": True} for i, p in enumerate(paths)]


def run_inline(paths: list[Path], label_config: str, batch: int) -> dict:
    from backend.serving.predict import predict_chunk
    from backend.serving.engine import get_engine
    from backend.settings import Settings

    get_engine(Settings.from_env())            # loaded before the clock starts, as in a worker
    version = f"bench-inline-{uuid.uuid4().hex[:6]}"
    tasks = ls_tasks(paths, "inline")
    predict_chunk(tasks[:batch], label_config=label_config, model_version="warm-up")
    lat, service = [], []
    t0 = time.perf_counter()
    for start in range(0, len(tasks), batch):
        chunk = tasks[start:start + batch]
        t = time.perf_counter()
        failed = [o.error for o in predict_chunk(chunk, label_config=label_config, model_version=version) if o.error]
        if failed:
            raise SystemExit(f"inline: {failed[0]!r}")
        took = time.perf_counter() - t
        lat += [took] * len(chunk)
        service += [took / len(chunk)] * len(chunk)
    wall = time.perf_counter() - t0
    return {"mode": "inline", "workers": 0, "batch": batch, "n": len(paths), "wall_s": wall,
            "photos_s": len(paths) / wall, "lat_p50": _pct(lat, .5), "lat_p95": _pct(lat, .95),
            "service_p50": _pct(service, .5), "mean_task_s": wall / len(paths)}


def run_queue(paths: list[Path], label_config: str, n_workers: int, batch: int, chunk: int, url: str,
              log_dir: Path) -> dict:
    import redis
    from rq.job import Job, JobStatus
    from rq.worker_registration import get_keys

    from backend.queue.queues import enqueue_predictions, get_queues

    ns = f"t2mbench-{uuid.uuid4().hex[:8]}"
    os.environ["TAG2MASK_NAMESPACE"] = ns
    conn = redis.Redis.from_url(url)
    env = dict(os.environ, REDIS_URL=url, TAG2MASK_NAMESPACE=ns, PYTHONPATH=str(REPO),
               TAG2MASK_THREADS=os.environ.get("TAG2MASK_THREADS", "1"), LOG_LEVEL="WARNING")
    procs = [subprocess.Popen([sys.executable, "-m", "backend.worker", "--preload", "--queues", "batch",
                               "--batch-size", str(batch), "--name", f"{ns}-w{i}", "--log-level", "WARNING"],
                              cwd=REPO, env=env,
                              stdout=open(log_dir / f"{ns}-w{i}.log", "wb"), stderr=subprocess.STDOUT)
             for i in range(n_workers)]
    try:
        deadline = time.monotonic() + 300
        queues = get_queues(conn, ["batch"])
        while len(get_keys(queue=queues[0])) < n_workers:     # registered = model loaded (--preload)
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"workers did not start; see {log_dir}")
            time.sleep(0.2)
        # one warm-up job per worker (first-call costs), off the clock
        warm = enqueue_predictions(conn, project=ns + "-warm", tasks=ls_tasks(paths[:n_workers * batch], ns),
                                   label_config=label_config, model_version=f"warm-{ns}", priority="batch",
                                   chunk_size=batch, push=False)
        while any(j.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED) for j, _ in warm):
            time.sleep(0.05)
        version = f"bench-q{n_workers}-b{batch}-{uuid.uuid4().hex[:6]}"

        def one_pass(rerun: bool) -> tuple[list[str], float]:
            t0 = time.perf_counter()
            jobs = enqueue_predictions(conn, project=ns, tasks=ls_tasks(paths, ns), label_config=label_config,
                                       model_version=version, priority="batch", chunk_size=chunk, push=False,
                                       rerun_finished=rerun)
            ids = [j.id for j, _ in jobs]
            pending = set(ids)
            while pending:
                done = {j.id for j in Job.fetch_many(list(pending), connection=conn)
                        if j is not None and j.get_status(refresh=False) in (JobStatus.FINISHED, JobStatus.FAILED)}
                pending -= done
                if pending:
                    time.sleep(0.02)
            return ids, time.perf_counter() - t0

        ids, wall = one_pass(False)
        fetched = Job.fetch_many(ids, connection=conn)
        failed = sum(1 for j in fetched if j.get_status(refresh=False) == JobStatus.FAILED)
        lat = [(j.ended_at - j.enqueued_at).total_seconds() for j in fetched if j.ended_at
               for _ in range(int(j.meta.get("total", 1)))]
        service = [(j.ended_at - j.started_at).total_seconds() / int(j.meta.get("total", 1))
                   for j in fetched if j.ended_at and j.started_at for _ in range(int(j.meta.get("total", 1)))]
        # the same jobs again: every prediction is a cache hit, so the time is the queue's own cost
        # (enqueue, dequeue, photo read + hash, cache lookup, result storage) without the engine
        _, cached_wall = one_pass(True)
        return {"mode": "queue", "workers": n_workers, "batch": batch, "n": len(paths), "failed": failed,
                "wall_s": wall,
                "photos_s": len(paths) / wall, "lat_p50": _pct(lat, .5), "lat_p95": _pct(lat, .95),
                "service_p50": _pct(service, .5), "cached_task_s": n_workers * cached_wall / len(paths)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for key in conn.scan_iter(match=f"*{ns}*", count=1000):
            conn.delete(key)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=300, help="photos (default 300; repeats the set if larger)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 8],
                    help="photos per engine call, inline and in the workers (default: 1 8)")
    ap.add_argument("--chunk", type=int, default=8, help="tasks per queued job (default 8, as TAG2MASK_BATCH_CHUNK)")
    ap.add_argument("--preset", default=os.environ.get("TAG2MASK_PRESET", "balanced"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("TAG2MASK_THREADS", "1")
    os.environ["TAG2MASK_PRESET"] = args.preset
    os.environ["TAG2MASK_LOCAL_ROOTS"] = str(HORSE_DIR)
    for k in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        os.environ.pop(k, None)
    from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
    from backend.storage.connection import EmbeddedValkey

    paths = photos(args.limit)
    tmp = Path(tempfile.mkdtemp(prefix="t2m-qbench-"))
    valkey = None
    url = os.environ.get("REDIS_URL", "").strip()
    if not url:
        valkey = EmbeddedValkey(tmp / "valkey")
        url = valkey.ensure_running()
    rows = []
    try:
        for b in args.batch_size:
            rows.append(run_inline(paths, DEFAULT_LABEL_CONFIG, b))
            print(f"inline, batch {b}: done", file=sys.stderr, flush=True)
            for k in args.workers:
                rows.append(run_queue(paths, DEFAULT_LABEL_CONFIG, k, b, args.chunk, url, tmp))
                print(f"queue, {k} worker(s), batch {b}: done", file=sys.stderr, flush=True)
    finally:
        if valkey is not None:
            valkey.stop()
    inline = {r["batch"]: r for r in rows if r["mode"] == "inline"}
    for r in rows:
        r["overhead_s"] = (r["workers"] * r["wall_s"] / r["n"] - inline[r["batch"]]["mean_task_s"]) \
            if r["workers"] else 0.0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    server = "embedded Valkey" if valkey is not None else url
    print(f"\n{len(paths)} photos, preset {args.preset}, jobs of {args.chunk} tasks, "
          f"TAG2MASK_THREADS={os.environ['TAG2MASK_THREADS']} per process, {os.cpu_count()} CPUs, {server}\n")
    print("| mode | batch | photos/s | latency p50 (s) | latency p95 (s) | service p50 (s/task) "
          "| overhead/task vs inline (s) | queue-only cost/task, cache hits (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "inline (engine in-process)" if r["mode"] == "inline" else f"queue, {r['workers']} worker(s)"
        cached = f"{r['cached_task_s']:.4f}" if r["workers"] else "-"
        print(f"| {name} | {r['batch']} | {r['photos_s']:.2f} | {r['lat_p50']:.2f} | {r['lat_p95']:.2f} | "
              f"{r['service_p50']:.3f} | {r['overhead_s']:+.3f} | {cached} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
