"""Hostile input against the real server (``python -m backend.serve``: gunicorn, fast preset, one model
load for the module, real Weizmann horse photos): every malformed request gets a 4xx with a sentence,
every malformed task fails alone with a sentence while the good tasks of its batch are answered,
payload-controlled resources (body size, nesting, task count, canvases, RLE, polygon points, metrics
counters, echoed strings) are bounded, and /health is UP at the end, with no traceback in the log."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import requests
from PIL import Image

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.results import mask_to_rle
from tests.backend_process import backend_env, backend_process, free_port

GOOD_PHOTO = "/data/local-files/?d=images/horse283.jpg"      # the classifier itself says horse
MAX_REQUEST_BYTES = 16 * 1024 * 1024                           # the server's TAG2MASK_MAX_REQUEST_BYTES here
BIG = "é" * 10_000                                             # a 10 000-character unicode string
WEBHOOK_PROJECT = {"id": 3, "label_config": DEFAULT_LABEL_CONFIG}


class _Server:
    def __init__(self, base: str, log_path, proc):
        self.base, self.log_path, self.proc = base, log_path, proc

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 300)
        return requests.post(self.base + path, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return requests.get(self.base + path, **kw)

    def predict(self, tasks, **extra) -> requests.Response:
        return self.post("/predict", json={"tasks": tasks, "label_config": DEFAULT_LABEL_CONFIG, "project": "1",
                                           **extra})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(horse_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    env = backend_env(TAG2MASK_PRESET="fast", TAG2MASK_LOCAL_ROOTS=str(horse_dir), TAG2MASK_QUEUE="off",
                      TAG2MASK_WARMUP="1", TAG2MASK_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
                      MODEL_DIR=str(tmp / "model_dir"))
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log, backend_process(port, env, cwd=tmp, stdout=log) as proc:
        srv = _Server(f"http://127.0.0.1:{port}", log_path, proc)
        for _ in range(240):
            try:
                if srv.get("/health", timeout=1).json()["status"] == "UP":
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("the server did not answer /health:\n" + srv.log()[-3000:])
        yield srv


def _good(tid: int) -> dict:
    return {"id": tid, "data": {"image": GOOD_PHOTO}}


def _choices_ann(*values, ann_id=1, from_name="tag", **extra) -> dict:
    return {"id": ann_id, "result": [{"type": "choices", "from_name": from_name, "to_name": "image",
                                      "value": {"choices": list(values)}}], **extra}


def _with_result(*items) -> dict:
    return {"id": 7, "data": {"image": GOOD_PHOTO}, "annotations": [{"id": 1, "result": list(items)}]}


def _choices_item(value) -> dict:
    return {"type": "choices", "from_name": "tag", "to_name": "image", "value": value}


# -- one /predict batch: the good photo first and last, every malformed task in between ---------------------
BAD_TASKS = [  # (case, task, what its "error" says)
    ("data-string", {"id": 11, "data": "x"}, "the task's data must be a JSON object, not a string"),
    ("data-list", {"id": 12, "data": [GOOD_PHOTO]}, "the task's data must be a JSON object, not a list"),
    ("task-string", "hello", "a task must be a JSON object, not a string"),
    ("task-number", 5, "a task must be a JSON object, not a number"),
    ("task-null", None, "a task must be a JSON object, not null"),
    ("task-list", [_good(13)], "a task must be a JSON object, not a list"),
    ("annotations-string", {**_good(14), "annotations": "Horse"},
     "the task's annotations must be a list, not a string"),
    ("annotations-object", {**_good(15), "annotations": {"id": 1}},
     "the task's annotations must be a list, not an object"),
    ("annotation-number", {**_good(16), "annotations": [5]},
     "annotation 0 of the task must be a JSON object, not a number"),
    ("result-object", {**_good(17), "annotations": [{"id": 1, "result": {"type": "choices"}}]},
     "the result of annotation 0 must be a list, not an object"),
    ("result-item-string", _with_result("Horse"), "result item 0 of annotation 0 must be a JSON object, not a string"),
    ("value-string", _with_result(_choices_item("Horse")),
     "the value of result item 0 of annotation 0 must be a JSON object, not a string"),
    ("value-list", _with_result(_choices_item(["Horse"])),
     "the value of result item 0 of annotation 0 must be a JSON object, not a list"),
    ("choices-number", _with_result(_choices_item({"choices": [5]})),
     "a choices value of result item 0 of annotation 0 must be a string, not a number"),
    ("choices-object", _with_result(_choices_item({"choices": [{"Horse": 1}]})),
     "a choices value of result item 0 of annotation 0 must be a string, not an object"),
    ("choices-string", _with_result(_choices_item({"choices": "Horse"})),
     "the choices of result item 0 of annotation 0 must be a list, not a string"),
    ("too-many-tags", {**_good(18), "annotations": [_choices_ann(*[f"t{i}" for i in range(60)], from_name="x")]},
     "annotation 0 names 60 tags; at most 50"),
    ("raw-tag-too-long", {**_good(19), "annotations": [_choices_ann("h" * 300, from_name="x")]},
     "is 300 characters long; a tag has at most 200"),
    ("id-huge", {**_good(0), "id": 10 ** 30}, "the task's id must be an integer from 0 to 2^63-1"),
    ("id-negative", {**_good(0), "id": -1}, "the task's id must be an integer from 0 to 2^63-1"),
    ("id-float", {**_good(0), "id": 1.5}, "the task's id must be an integer, not a number"),
    ("id-list", {**_good(0), "id": [1]}, "the task's id must be an integer, not a list"),
    ("id-bool", {**_good(0), "id": True}, "the task's id must be an integer, not a boolean"),
    ("id-long-string", {**_good(0), "id": BIG}, "the task's id must be an integer or a short printable string"),
    ("id-newline", {**_good(0), "id": "1\n2"}, "the task's id must be an integer or a short printable string"),
    ("image-number", {"id": 20, "data": {"image": 5}},
     "the task's data['image'] must be a string (the photo's URL or path), not a number"),
    ("image-object", {"id": 21, "data": {"image": {"url": GOOD_PHOTO}}},
     "the task's data['image'] must be a string (the photo's URL or path), not an object"),
    ("image-missing", {"id": 22, "data": {"img": GOOD_PHOTO}}, "task data has no 'image' field"),
    ("data-null", {"id": 23, "data": None}, "task data has no 'image' field"),
]
# tasks that look odd but are fine: answered like the good one
ODD_BUT_FINE = [
    ("annotation-ids-of-mixed-types", {**_good(30), "annotations": [_choices_ann("Horse", ann_id="a"),
                                                                     _choices_ann("Horse", ann_id=2)]}),
    ("unicode-junk-choice-ignored", {**_good(31), "annotations": [_choices_ann("\u202e\U0001f434\x00")]}),
    ("only-cancelled-annotations", {**_good(32), "annotations": [{**_choices_ann("Dog"), "was_cancelled": True}]}),
]
FETCH_JUNK = [  # photo references no file has: a per-task fetch error (backend.labelstudio.photos), cut short
    ("image-10k-unicode", {"id": 40, "data": {"image": "/data/local-files/?d=images/" + BIG}},
     "the local file name is too long"),
    ("image-nul", {"id": 41, "data": {"image": "/data/local-files/?d=images/horse283.jpg\x00.png"}},
     "the local file path contains a NUL character"),
    ("image-rtl-emoji", {"id": 42, "data": {"image": "/data/local-files/?d=images/\u202e\U0001f434.jpg"}},
     "no such file under the local roots"),
]


@pytest.fixture(scope="module")
def batch(server):
    tasks = [_good(1)] + [t for _, t, _ in BAD_TASKS] + [t for _, t in ODD_BUT_FINE] + \
        [t for _, t, _ in FETCH_JUNK] + [_good(2)]
    r = server.predict(tasks)
    assert r.status_code == 200, r.text[:500]
    results = r.json()["results"]
    assert len(results) == len(tasks)
    return {"first": results[0], "last": results[-1],
            "bad": dict(zip([c for c, _, _ in BAD_TASKS], results[1:])),
            "fine": dict(zip([c for c, _ in ODD_BUT_FINE], results[1 + len(BAD_TASKS):])),
            "fetch": dict(zip([c for c, _, _ in FETCH_JUNK], results[1 + len(BAD_TASKS) + len(ODD_BUT_FINE):-1]))}


def _answered(entry: dict) -> None:
    assert "error" not in entry, entry.get("error")
    assert {it["type"] for it in entry["result"]} == {"choices", "brushlabels", "polygonlabels", "rectanglelabels"}


def test_good_tasks_of_the_hostile_batch_are_answered(batch):
    _answered(batch["first"])
    _answered(batch["last"])
    assert batch["first"]["model_version"] == batch["last"]["model_version"]


@pytest.mark.parametrize("case,expected", [(c, e) for c, _, e in BAD_TASKS], ids=[c for c, _, _ in BAD_TASKS])
def test_malformed_task_fails_alone_with_a_sentence(batch, case, expected):
    entry = batch["bad"][case]
    assert "result" not in entry and entry["score"] == 0.0
    assert expected in entry["error"]
    assert len(entry["error"]) <= 500


@pytest.mark.parametrize("case", [c for c, _ in ODD_BUT_FINE])
def test_odd_but_valid_task_is_answered(batch, case):
    _answered(batch["fine"][case])


@pytest.mark.parametrize("case,expected", [(c, e) for c, _, e in FETCH_JUNK], ids=[c for c, _, _ in FETCH_JUNK])
def test_junk_photo_reference_is_a_short_task_error(batch, case, expected):
    entry = batch["fetch"][case]
    assert "result" not in entry and expected in entry["error"]
    assert len(entry["error"]) <= 500


# -- request-level refusals ------------------------------------------------------------------------------
def _raw(data: bytes, content_type: str = "application/json") -> dict:
    return {"data": data, "headers": {"Content-Type": content_type}}


def _body(obj) -> dict:
    return {"json": obj}


def _predict_body(**fields) -> dict:
    return {"json": {"tasks": [], "label_config": DEFAULT_LABEL_CONFIG, "project": "1", **fields}}


def _config_with(extra: str) -> str:
    return DEFAULT_LABEL_CONFIG.replace("</View>", extra + "</View>")


BILLION_LAUGHS = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                            for i in range(1, 10))
                  + ']>\n' + DEFAULT_LABEL_CONFIG.replace('<Choice value="Horse"/>', '<Choice value="&lol9;"/>'))
XXE = ('<?xml version="1.0"?>\n<!DOCTYPE v [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
       + DEFAULT_LABEL_CONFIG.replace('<Choice value="Horse"/>', '<Choice value="&xxe;"/><Choice value="Horse"/>'))
DEEP_XML = "<View>" * 5000 + DEFAULT_LABEL_CONFIG + "</View>" * 5000
MANY_LABELS = _config_with('<Choices name="many" toName="image">'
                           + "".join(f'<Choice value="c{i}"/>' for i in range(3000)) + "</Choices>")

REQUESTS = [  # (case, route, request kwargs (a function: built when run), status, what "error" says)
    ("nested-100k", "/predict", lambda: _raw(b'{"tasks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400,
     "the request body nests 100001 levels deep; at most 64 are accepted"),
    ("params-string", "/predict", lambda: _predict_body(params="x"), 400, "params must be a JSON object"),
    ("tasks-string", "/predict", lambda: _body({"tasks": "x"}), 400, "a list of tasks, not a string"),
    ("tasks-missing", "/predict", lambda: _body({"task": []}), 400, "the body needs \"tasks\": a list of tasks"),
    ("tasks-100k", "/predict", lambda: _predict_body(tasks=[{"id": i, "data": {}} for i in range(100_000)]), 413,
     "the request has 100000 tasks; at most 10000 are accepted"),
    ("body-20MB", "/predict", lambda: _raw(b'{"tasks": [], "pad": "' + b"x" * 20_000_000 + b'"}'), 413,
     f"the request body is larger than {MAX_REQUEST_BYTES} bytes (TAG2MASK_MAX_REQUEST_BYTES)"),
    ("body-20MB-webhook", "/webhook", lambda: _raw(b'{"action": "' + b"A" * 20_000_000 + b'"}'), 413,
     "the request body is larger than"),
    ("nan", "/predict", lambda: _raw(b'{"tasks": [{"id": NaN, "data": {}}]}'), 400, "NaN is not a JSON number"),
    ("infinity", "/predict", lambda: _raw(b'{"tasks": [], "x": -Infinity}'), 400, "-Infinity is not a JSON number"),
    ("number-5000-digits", "/predict", lambda: _raw(b'{"tasks": [{"id": ' + b"9" * 5000 + b"}]}"), 400,
     "holds a number of more than 4300 digits"),
    ("lone-surrogate", "/webhook", lambda: _raw(b'{"action": "ANNOTATION_CREATED", "x": "\\ud800"}'), 400,
     "unpaired UTF-16 surrogate"),
    ("not-utf8", "/predict", lambda: _raw(b'{"tasks": ["\xff\xfe"]}'), 400, "it is not UTF-8 text"),
    ("empty-body", "/predict", lambda: _raw(b""), 400, "the request body is empty"),
    ("truncated-json", "/webhook", lambda: _raw(b'{"action": "ANNOTATION_CR'), 400,
     "the request body is not valid JSON"),
    ("array-body", "/predict", lambda: _body([{"id": 1}]), 400, "the request body must be a JSON object, not a list"),
    ("form-body-sent-as-json", "/predict", lambda: _raw(b"tasks=1&project=2"), 400,
     "the request body is not valid JSON"),
    ("json-sent-as-form", "/webhook",
     lambda: _raw(b'{"action": 5}', "application/x-www-form-urlencoded"), 400, "the webhook body needs an \"action\""),
    ("label-config-number", "/predict", lambda: _predict_body(label_config=5), 400,
     "label_config must be the labeling config as a string of XML, not a number"),
    ("label-config-2MB", "/predict", lambda: _predict_body(label_config=_config_with("<!--" + "x" * 2_000_000 + "-->")),
     400, "characters long; at most 1000000 are accepted"),
    ("label-config-billion-laughs", "/predict", lambda: _predict_body(label_config=BILLION_LAUGHS), 400,
     "declares a <!DOCTYPE> or <!ENTITY>"),
    ("label-config-external-entity", "/predict", lambda: _predict_body(label_config=XXE), 400,
     "declares a <!DOCTYPE> or <!ENTITY>"),
    ("label-config-5000-deep", "/predict", lambda: _predict_body(label_config=DEEP_XML), 400,
     "the labeling config is not valid XML"),
    ("label-config-3000-labels", "/predict", lambda: _predict_body(label_config=MANY_LABELS), 400,
     "labels on <Image name='image'>; at most 2000 are supported"),
    ("project-list", "/predict", lambda: _predict_body(project=[1]), 400,
     "the project must be a Label Studio project id (an integer or a string), not a list"),
    ("project-path", "/predict", lambda: _predict_body(project="../../etc/passwd"), 400,
     "the project must be a Label Studio project id (digits"),
    ("project-10k-string", "/predict", lambda: _predict_body(project=BIG), 400,
     "the project must be a Label Studio project id (digits"),
    ("project-huge-int", "/predict", lambda: _predict_body(project=2 ** 70), 400,
     "the project must be a Label Studio project id from 0 to 2^63-1"),
    ("project-object-with-list-id", "/predict", lambda: _predict_body(project={"id": [1]}), 400,
     "the project's id must be a Label Studio project id (an integer or a string), not a list"),
    ("first-task-project", "/predict",
     lambda: {"json": {"tasks": [{**_good(1), "project": "a/b"}], "label_config": DEFAULT_LABEL_CONFIG}}, 400,
     "the first task's project must be a Label Studio project id"),
    ("setup-project-list", "/setup", lambda: _body({"project": [1], "schema": DEFAULT_LABEL_CONFIG}), 400,
     "the project must be a Label Studio project id"),
    ("setup-schema-number", "/setup", lambda: _body({"project": "4.1", "schema": 5}), 400,
     "the labeling config must be a string of XML, not a number"),
    ("setup-schema-entity", "/setup", lambda: _body({"project": "4.1", "schema": XXE}), 400,
     "declares a <!DOCTYPE> or <!ENTITY>"),
]


@pytest.mark.parametrize("case,route,make,status,expected", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_malformed_request_is_refused_with_a_sentence(server, case, route, make, status, expected):
    r = server.post(route, **make())
    assert r.status_code == status, r.text[:500]
    assert r.headers["Content-Type"].startswith("application/json")
    assert expected in r.json()["error"]
    assert len(r.json()["error"]) <= 1000 and "root:" not in r.text


def test_content_type_lies_are_ignored(server):
    """The body is JSON whatever its Content-Type says (Label Studio's GET /versions has none)."""
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "image/png"):
        r = server.post("/predict", **_raw(json.dumps({"tasks": [], "label_config": DEFAULT_LABEL_CONFIG}).encode(),
                                           ctype))
        assert r.status_code == 200 and r.json() == {"results": []}


def test_chunked_body_over_the_limit_is_413(server):
    """No Content-Length (chunked transfer): the limit is enforced while reading."""
    def chunks():
        yield b'{"tasks": [], "pad": "'
        for _ in range(20):
            yield b"x" * 1_000_000
        yield b'"}'

    r = server.post("/predict", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "TAG2MASK_MAX_REQUEST_BYTES" in r.json()["error"]
    small = server.post("/predict", data=iter([b'{"tasks": [], "label_config": ',
                                               json.dumps(DEFAULT_LABEL_CONFIG).encode(), b"}"]))
    assert small.status_code == 200 and small.json() == {"results": []}


@pytest.mark.parametrize("junk", [b'{"project": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"\xff\xfe", b"[1, 2",
                                  b'{"project": NaN}'],
                         ids=["nested", "not-utf8", "truncated", "nan"])
def test_versions_ignores_a_junk_body(server, junk):
    base = server.get("/health").json()["model_version"]
    r = server.get("/versions", data=junk)
    assert r.status_code == 200 and r.json() == {"versions": [base]}


@pytest.mark.parametrize("job_id,expected", [("x" * 3000, "the job queue is off"), ("%00%0a", "the job queue is off"),
                                             ("\U0001f434", "the job queue is off"), ("..%2F..%2Fetc", "")],
                         ids=["long", "control-chars", "emoji", "slashes"])
def test_jobs_with_junk_ids_answer_404(server, job_id, expected):
    r = server.get(f"/jobs/{job_id}")
    assert r.status_code == 404 and expected in r.json()["error"] and len(r.json()["error"]) <= 1000


def test_wrong_methods_and_routes_answer_json(server):
    r = server.get("/predict")
    assert r.status_code == 405 and r.json()["error"]
    r = server.post("/no/such/route", json={})
    assert r.status_code == 404 and r.json()["error"]


# -- webhooks ---------------------------------------------------------------------------------------------
def _webhook(annotation, action="ANNOTATION_CREATED", project=WEBHOOK_PROJECT, task=None) -> dict:
    body = {"action": action, "project": project, "annotation": annotation}
    body["task"] = task if task is not None else {"id": 70, "data": {"image": GOOD_PHOTO}}
    return body


def _ann(*result, **extra) -> dict:
    return {"id": 501, "task": 70, "result": list(result), **extra}


def _region(kind: str, value: dict, w=640, h=480, **extra) -> dict:
    from_name = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "box"}[kind]
    return {"type": kind, "from_name": from_name, "to_name": "image", "original_width": w, "original_height": h,
            "value": {kind: ["Horse"], **value}, **extra}


SQUARE = [[10, 10], [60, 10], [60, 60], [10, 60]]
RLE_10x10 = mask_to_rle(np.ones((10, 10), bool))

WEBHOOKS = [  # (case, body (a function), what "error" says); all answer 400
    ("annotation-number", lambda: _webhook(5), "the webhook's annotation must be a JSON object, not a number"),
    ("annotation-string", lambda: _webhook("x"), "the webhook's annotation must be a JSON object, not a string"),
    ("result-value-string", lambda: _webhook(_ann({"type": "choices", "from_name": "tag", "to_name": "image",
                                                   "value": "Horse"})),
     "result item 0's value must be a JSON object, not a string"),
    ("result-item-string", lambda: _webhook(_ann("Horse")), "result item 0 must be a JSON object, not a string"),
    ("result-object", lambda: _webhook({"id": 501, "result": {"a": 1}}),
     "the annotation's result must be a list, not an object"),
    ("choices-number", lambda: _webhook(_ann({"type": "choices", "from_name": "tag", "to_name": "image",
                                              "value": {"choices": [5]}})),
     "the values of result item 0's choices must be strings, not a number"),
    ("polygon-canvas-100000", lambda: _webhook(_ann(_region("polygonlabels", {"points": SQUARE}, 100_000, 100_000))),
     "result item 0 is on a 100000x100000 photo (10000000000 pixels); at most 40000000 pixels"),
    ("brush-canvas-100000", lambda: _webhook(_ann(_region("brushlabels", {"format": "rle", "rle": RLE_10x10},
                                                          100_000, 100_000))),
     "result item 0 is on a 100000x100000 photo"),
    ("brush-rle-wrong-size", lambda: _webhook(_ann(_region("brushlabels", {"format": "rle", "rle": RLE_10x10},
                                                           20, 10))),
     "result item 0's rle encodes 400 values; its 20x10 photo needs 800"),
    ("brush-rle-huge-header", lambda: _webhook(_ann(_region("brushlabels",
                                                            {"format": "rle", "rle": [255, 255, 255, 255, 0, 0]}))),
     "result item 0's rle encodes 4294967295 values; its 640x480 photo needs 1228800"),
    ("brush-rle-not-bytes", lambda: _webhook(_ann(_region("brushlabels", {"format": "rle", "rle": [0, 0, 300, "x"]}))),
     "result item 0's rle must hold integers from 0 to 255"),
    ("brush-rle-1.1M-values", lambda: _webhook(_ann(_region("brushlabels", {"format": "rle", "rle": [0] * 1_100_000}))),
     "the annotation's brush RLEs hold more than 1000000 values in all"),
    ("brush-rle-truncated", lambda: _webhook(_ann(_region("brushlabels", {"format": "rle", "rle": RLE_10x10[:6]},
                                                          10, 10))),
     "result item 0's rle is not a valid Label Studio brush RLE"),
    ("polygon-60k-points", lambda: _webhook(_ann(_region("polygonlabels", {"points": [[1.0, 2.0]] * 60_000}))),
     "result item 0 has 60000 points; at most 50000 are accepted"),
    ("polygon-point-string", lambda: _webhook(_ann(_region("polygonlabels", {"points": ["10,10", "20,20"]}))),
     "point 0 of result item 0 must be a list [x, y], not a string"),
    ("polygon-point-huge", lambda: _webhook(_ann(_region("polygonlabels", {"points": [[1e300, 1], [2, 2], [3, 1]]}))),
     "a position in percent of the photo lies within"),
    ("polygon-regions-over-budget", lambda: _webhook(_ann(*[_region("polygonlabels", {"points": SQUARE}, 5000, 5000)
                                                            for _ in range(20)])),
     "the annotation's brush and polygon regions cover more than 400000000 pixels"),
    ("rectangle-x-string", lambda: _webhook(_ann(_region("rectanglelabels", {"x": "abc", "y": 1, "width": 5,
                                                                             "height": 5}))),
     "result item 0's x must be a number (percent of the photo), not a string"),
    ("rectangle-rotation-list", lambda: _webhook(_ann(_region("rectanglelabels", {"x": 1, "y": 1, "width": 5,
                                                                                  "height": 5, "rotation": [1]}))),
     "result item 0's rotation must be a number (degrees), not a list"),
    ("width-negative", lambda: _webhook(_ann(_region("polygonlabels", {"points": SQUARE}, -5, 10))),
     "result item 0's original_width must be a positive integer (pixels), not -5"),
    ("height-string", lambda: _webhook(_ann(_region("polygonlabels", {"points": SQUARE}, 10, "ten"))),
     "result item 0's original_height must be a positive integer (pixels), not a string"),
    ("labels-not-strings", lambda: _webhook(_ann({**_region("polygonlabels", {"points": SQUARE}),
                                                  "value": {"points": SQUARE, "polygonlabels": [["Horse"]]}})),
     "the values of result item 0's polygonlabels must be strings, not a list"),
    ("annotation-id-list", lambda: _webhook({"id": [1], "result": []}),
     "an id must be an integer or a short printable string, not a list"),
    ("deleted-ids-junk", lambda: {"action": "ANNOTATIONS_DELETED", "project": WEBHOOK_PROJECT, "annotations": [[1]]},
     "an id must be an integer or a short printable string, not a list"),
    ("task-data-string", lambda: _webhook(_ann(), task={"id": 70, "data": "x"}),
     "the task's data must be a JSON object, not a string"),
    ("task-photo-number", lambda: _webhook(_ann(), task={"id": 70, "data": {"image": 5}}),
     "the task's photo (data['image']) must be a string, not a number"),
    ("updated-at-object", lambda: _webhook(_ann(updated_at={"t": 1})),
     "the annotation's updated_at/created_at must be an ISO-8601 time string, not an object"),
    ("project-list", lambda: _webhook(_ann(), project=[3]), "the project must be a Label Studio project id"),
    ("project-path", lambda: _webhook(_ann(), project={"id": "../x"}),
     "the project's id must be a Label Studio project id"),
    ("annotation-project-junk", lambda: _webhook(_ann(project="a b"), project=None),
     "the annotation's project must be a Label Studio project id"),
    ("project-label-config-number", lambda: _webhook(_ann(), project={"id": 3, "label_config": 5}),
     "the project's label_config must be the labeling config as a string of XML, not a number"),
    ("action-number", lambda: {"action": 5}, "the webhook body needs an \"action\""),
    ("training-project-junk", lambda: {"action": "START_TRAINING", "project": {"id": {"id": 3}}},
     "the project's id must be a Label Studio project id (an integer or a string), not an object"),
]


@pytest.mark.parametrize("case,make,expected", WEBHOOKS, ids=[w[0] for w in WEBHOOKS])
def test_malformed_webhook_is_refused_with_a_sentence(server, case, make, expected):
    r = server.post("/webhook", json=make())
    assert r.status_code == 400, r.text[:500]
    assert expected in r.json()["error"]
    assert len(r.json()["error"]) <= 1000


def test_a_real_annotation_webhook_is_still_stored(server, horse_dir):
    mask = np.asarray(Image.open(horse_dir / "masks" / "horse283.png")) > 0
    h, w = mask.shape
    ann = {"id": 777, "task": 70, "result": [
        {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": w, "original_height": h,
         "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Horse"]}},
        {"type": "polygonlabels", "from_name": "polygon", "to_name": "image", "original_width": w,
         "original_height": h, "value": {"points": SQUARE, "polygonlabels": ["Horse"]}}]}
    r = server.post("/webhook", json=_webhook(ann))
    assert r.status_code == 200, r.text[:500]
    assert r.json()["training"]["status"] == "stored" and r.json()["training"]["annotation_ids"] == ["777"]


def test_unknown_webhook_actions_share_one_counter(server):
    before = server.get("/metrics").json()
    for i in range(3):
        action = f"{i}-" + "Z" * 10_000
        r = server.post("/webhook", json={"action": action})
        assert r.status_code == 200 and r.json()["status"] == "ignored"
        assert r.json()["action"].startswith(f"{i}-ZZZ") and len(r.json()["action"]) < 120
    after = server.get("/metrics").json()
    assert after.get("webhook_unknown", 0) - before.get("webhook_unknown", 0) == 3
    assert set(after) - set(before) <= {"webhook_unknown"}
    assert max(len(k) for k in after) < 64
    prom = server.get("/metrics", params={"format": "prometheus"}).text
    assert "ZZZZ" not in prom and re.search(r"^tag2mask_webhook_unknown [0-9]+$", prom, re.M)


# -- the labeling config ----------------------------------------------------------------------------------
ORPHAN_BRUSH = DEFAULT_LABEL_CONFIG.replace('<BrushLabels name="brush" toName="image">',
                                            '<BrushLabels name="brush" toName="img9">')


def test_region_control_bound_to_no_image_is_warned_once(server):
    """A BrushLabels whose toName names no Image gets no predictions: the others still do, and the log
    says so once per config (two projects parse the same config)."""
    for project in ("21", "22"):
        r = server.post("/predict", json={"tasks": [_good(1)], "label_config": ORPHAN_BRUSH, "project": project})
        assert r.status_code == 200
        (entry,) = r.json()["results"]
        assert {it["type"] for it in entry["result"]} == {"choices", "polygonlabels", "rectanglelabels"}
    warned = [line for line in server.log().splitlines() if "control 'brush' gets no predictions" in line]
    assert len(warned) == 1 and "'img9'" in warned[0], warned


# -- echoes and the end state -----------------------------------------------------------------------------
def test_echoed_values_are_cut_short_in_replies_and_logs(server, batch):
    assert BIG[:60] in batch["bad"]["id-long-string"]["error"]             # quoted, but cut short
    assert "10000 characters" in batch["bad"]["id-long-string"]["error"]
    for line in server.log().splitlines():
        assert len(line) < 2500, line[:300]


def test_server_is_healthy_after_everything(server):
    r = server.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "UP" and r.json()["model_loaded"] is True
    assert server.proc.poll() is None
    log = server.log()
    assert "Traceback" not in log and "the server failed" not in log, log[-3000:]
    metrics = server.get("/metrics").json()
    assert metrics.get("http_500", 0) == 0
