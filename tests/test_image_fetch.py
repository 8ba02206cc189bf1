"""backend.labelstudio.photos against a real HTTP server on 127.0.0.1 and real files (horse photos)."""
from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from backend.labelstudio.photos import ImageFetcher, ImageFetchError
from backend.labelstudio.urls import safe_url
from backend.settings import Settings
from tests.conftest import horse_stems

TOKEN = "secret-token-123"


class _Handler(BaseHTTPRequestHandler):
    photo: bytes = b""
    seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/data/upload/") or self.path.startswith("/img/"):
            if self.path.startswith("/data/") and self.headers.get("Authorization") != f"Token {TOKEN}":
                return self._send(401, b"no")
            return self._send(200, self.photo, "image/jpeg")
        if self.path == "/text":
            return self._send(200, b"this is not an image at all", "text/plain")
        if self.path == "/huge-nolength":   # streamed without Content-Length
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"\0" * 65536)
            except OSError:          # the client hangs up at its size cap
                pass
            return
        if self.path.startswith("/redirect-out"):
            self.send_response(302)
            self.send_header("Location", "http://10.255.255.1/x.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/redirect-in"):
            self.send_response(302)
            self.send_header("Location", "/img/ok.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        return self._send(404, b"not found")

    def _send(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(horse_dir):
    _Handler.photo = (horse_dir / "images" / f"{horse_stems('test')[0]}.jpg").read_bytes()
    _Handler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _fetcher(**kw) -> ImageFetcher:
    return ImageFetcher(Settings.from_env(env={}, **kw))


def test_upload_from_label_studio_with_token(server):
    f = _fetcher(label_studio_url=server, label_studio_api_key=TOKEN)
    img = f.load("/data/upload/1/abc-horse.jpg")
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert _Handler.seen[-1] == ("/data/upload/1/abc-horse.jpg", f"Token {TOKEN}")
    # without a key: 401 from the server, reported without any secret
    with pytest.raises(ImageFetchError, match="HTTP 401"):
        _fetcher(label_studio_url=server).load("/data/upload/1/abc-horse.jpg")
    # hostname / token from /setup are used when the environment has none
    assert _fetcher().load("/data/upload/1/x.jpg", ls_url=server, api_key=TOKEN).shape == img.shape


def test_http_hosts_are_guarded_and_token_stays_home(server):
    f = _fetcher(label_studio_url="http://127.0.0.1:9", label_studio_api_key=TOKEN)
    with pytest.raises(ImageFetchError, match="not allowed") as err:
        f.load(server + "/img/a.jpg?X-Signature=abc")
    assert TOKEN not in str(err.value) and "X-Signature" not in str(err.value)
    port = server.rsplit(":", 1)[1]
    g = _fetcher(label_studio_url="http://127.0.0.1:9", label_studio_api_key=TOKEN, allowed_hosts=[f"127.0.0.1:{port}"])
    assert g.load(server + "/img/a.jpg").ndim == 3
    assert _Handler.seen[-1] == ("/img/a.jpg", None)          # the token is not sent to another host
    assert _fetcher(allowed_hosts=["*"]).load(server + "/redirect-in").ndim == 3
    with pytest.raises(ImageFetchError, match="redirected to a host that is not allowed"):
        g.load(server + "/redirect-out")


def test_bad_remote_content(server):
    f = _fetcher(label_studio_url=server, label_studio_api_key=TOKEN, max_image_bytes=1_000_000)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        f.load(server + "/missing.jpg")
    with pytest.raises(ImageFetchError, match="not an image"):
        f.load(server + "/text")
    with pytest.raises(ImageFetchError, match="more than 1,000,000 bytes"):
        f.load(server + "/huge-nolength")
    with pytest.raises(ImageFetchError, match="over the limit"):
        _fetcher(label_studio_url=server, max_image_bytes=1000).load(server + "/img/a.jpg")
    with pytest.raises(ImageFetchError, match="download failed"):
        _fetcher(label_studio_url="http://127.0.0.1:9").load("/data/upload/1/a.jpg")


def test_local_roots(horse_dir, tmp_path):
    stem = horse_stems("test")[0]
    f = _fetcher(local_roots=[horse_dir])
    a = f.load(f"/data/local-files/?d=images/{stem}.jpg")
    b = f.load(f"/data/local-files/?d={horse_dir}/images/{stem}.jpg")      # absolute, inside the root
    c = f.load(str(horse_dir / "images" / f"{stem}.jpg"))                    # plain path
    assert a.shape == b.shape == c.shape and np.array_equal(a, c)
    with pytest.raises(ImageFetchError, match=r"'\.\.' is not allowed"):
        f.load("/data/local-files/?d=images/../../../../etc/passwd")
    with pytest.raises(ImageFetchError, match="no such file"):
        f.load("/data/local-files/?d=images/nope.jpg")
    with pytest.raises(ImageFetchError, match="outside the allowed local roots"):
        f.load("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd")
    # a symlink inside a root pointing out of it is refused
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((horse_dir / "images" / f"{stem}.jpg").read_bytes())
    (root / "link.jpg").symlink_to(outside)
    (root / "notimage.jpg").write_bytes(b"hello")
    g = _fetcher(local_roots=[root])
    with pytest.raises(ImageFetchError, match="outside the allowed local roots"):
        g.load("/data/local-files/?d=link.jpg")
    with pytest.raises(ImageFetchError, match="not an image"):
        g.load("/data/local-files/?d=notimage.jpg")
    with pytest.raises(ImageFetchError, match="disabled"):
        _fetcher().load(str(outside))


def test_unsupported_and_cloud_without_task(server):
    f = _fetcher(label_studio_url=server)
    with pytest.raises(ImageFetchError, match="unsupported"):
        f.load("ftp://example.org/a.jpg")
    with pytest.raises(ImageFetchError, match="needs the task id"):
        f.load("s3://bucket/a.jpg")
    with pytest.raises(ImageFetchError, match="HTTP 404"):   # presign endpoint asked on Label Studio's host
        f.load("s3://bucket/a.jpg", task_id=7)
    assert _Handler.seen[-1][0].startswith("/tasks/7/presign/?fileuri=")
    with pytest.raises(ImageFetchError, match="no image URL"):
        f.load("")


def test_safe_url():
    assert safe_url("https://u:p@h.org:8443/a/b.jpg?sig=1") == "https://h.org:8443/a/b.jpg"
    assert safe_url("/data/local-files/?d=x/y.jpg") == "/data/local-files/?d=x/y.jpg"


def test_odd_local_paths_give_sentences(horse_dir, tmp_path):
    """OS trouble with a local path (too long, NUL, unpaired surrogate, a folder, a FIFO) is a sentence
    naming the path, cut to 200 characters, with control characters escaped."""
    f = _fetcher(local_roots=[horse_dir])

    def refused(url: str, match: str) -> str:
        with pytest.raises(ImageFetchError, match=match) as err:
            f.load(url)
        msg = str(err.value)
        assert "internal error" not in msg and len(msg) < 300 and "\n" not in msg and "\0" not in msg, msg
        return msg

    msg = refused("/data/local-files/?d=" + "a" * 5000 + ".jpg", "the local file name is too long")
    assert "…" in msg
    refused("/data/local-files/?d=" + "ab/" * 1500 + "x.jpg", "the local file name is too long")   # > PATH_MAX
    refused(str(horse_dir / ("b" * 300 + ".jpg")), "the local file name is too long")
    refused("/data/local-files/?d=images/a%00.jpg", "contains a NUL character")
    refused(str(horse_dir / "images" / "\ud800.jpg"), "not valid text")
    refused("/data/local-files/?d=images", "it is a folder, not a photo file")
    assert "\\u202e" in refused("/data/local-files/?d=images/\u202egpj.exe", "no such file")
    assert "\\n" in refused("/data/local-files/?d=images/a%0Ab.jpg", "no such file")
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")
    g = _fetcher(local_roots=[root])
    with pytest.raises(ImageFetchError, match="not a regular file"):     # and does not block on the FIFO
        g.load("/data/local-files/?d=pipe.jpg")
    # through Label Studio's full URL when the roots are set
    h = _fetcher(local_roots=[horse_dir], label_studio_url="http://localhost:8080")
    with pytest.raises(ImageFetchError, match="too long"):
        h.load("http://localhost:8080" + "/data/local-files/?d=" + "c" * 5000 + ".jpg")
