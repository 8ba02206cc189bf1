"""A queue-mode web process (``TAG2MASK_QUEUE=on``, ``REDIS_URL`` set) never loads torch: inference is
the workers'. /health, /setup, /versions, /predict (enqueued) and /webhook (an annotation stored, a
training queued) all answer, and ``torch`` is not in ``sys.modules`` afterwards.

Run in a fresh interpreter (the test session itself has imported torch), on a real Redis: the
embedded Valkey, then the machine's Redis.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from ls_payloads import horse_webhooks
from redis_servers import embedded_valkey, server  # noqa: F401  (fixtures)

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from tests.backend_process import backend_env
from tests.conftest import REPO, horse_stems

_WEB = textwrap.dedent("""
    import json, sys
    from backend.settings import Settings
    from backend.web.app import create_app
    args = json.loads(sys.argv[1])
    app = create_app(Settings.from_env())
    c = app.test_client()
    out = {}
    out["health"] = c.get("/health").json
    out["setup"] = c.post("/setup", json={"project": "7.1700000000", "schema": args["config"],
                                         "hostname": "http://localhost:8080", "access_token": "tok"}).json
    out["versions"] = c.get("/versions", json={"project": "7.1700000000"}).json
    r = c.post("/predict", json={"tasks": args["tasks"], "label_config": args["config"], "project": "7.1700000000"})
    out["predict"] = [r.status_code, r.json]
    out["webhooks"] = [c.post("/webhook", json=body).json for body in args["webhooks"]]
    out["start_training"] = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).json
    out["torch"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:5]
    print(json.dumps(out))
""")


def test_queue_mode_web_process_answers_every_route_without_torch(server, tmp_path, horse_dir):  # noqa: F811
    stems = horse_stems("train")[:2]
    tasks = [{"id": 100 + k, "data": {"image": str(horse_dir / "images" / f"{stem}.jpg")}}
             for k, stem in enumerate(stems)]
    webhooks = horse_webhooks(horse_dir, stems, 7)
    env = backend_env(REDIS_URL=server.url, TAG2MASK_QUEUE="on", TAG2MASK_NAMESPACE=server.token,
                      MODEL_DIR=str(tmp_path / "md"), TAG2MASK_SYNC_MAX_TASKS="0",
                      TAG2MASK_LOCAL_ROOTS=str(horse_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    arg = json.dumps({"config": DEFAULT_LABEL_CONFIG, "tasks": tasks, "webhooks": webhooks})
    run = subprocess.run([sys.executable, "-c", _WEB, arg], cwd=str(REPO), env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["torch"] == [], out["torch"]
    assert out["health"]["status"] == "UP" and out["health"]["model_state"] == "workers", out["health"]
    base = out["setup"]["model_version"]
    assert base.startswith("tag2mask-") and out["versions"] == {"versions": [base]}
    status, reply = out["predict"]
    assert status == 200 and len(reply["results"]) == len(tasks)
    assert all(r.get("status") == "queued" and r.get("job") and "result" not in r for r in reply["results"]), reply
    assert [w["training"]["status"] for w in out["webhooks"]] == ["stored", "stored"], out["webhooks"]
    assert out["start_training"]["training"]["status"] == "queued", out["start_training"]
