"""backend.labelstudio.photos against URL tricks: what is checked is what is connected to, and Label Studio's
token goes only to Label Studio's scheme, host and port.

Two real HTTP servers on 127.0.0.1: "Label Studio" (serves /data/upload/ with the token, redirects,
a presign endpoint, misbehaving bodies) and a recording listener standing for any other address
(169.254.169.254, an internal service): it records every connection it accepts and the headers of
every request, so each test can assert that an attack never reached it or reached it without the token.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote

import pytest

from backend.labelstudio.photos import ImageFetcher, ImageFetchError
from backend.labelstudio.urls import safe_url
from backend.settings import Settings
from tests.conftest import horse_stems

TOKEN = "ls-secret-token-9f3a"
_PROBE = "/__probe__"


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", **headers):
        self.send_response(code)
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class Listener:
    """A real HTTP server on 127.0.0.1 recording every accepted connection and every request's headers."""

    def __init__(self, photo: bytes):
        self.accepted = 0
        self.requests: list[tuple[str, dict]] = []
        rec = self

        class Handler(_Quiet):
            def do_GET(self):
                rec.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                self._send(200, photo, Content_Type="image/jpeg", Set_Cookie="session=listener-cookie; Path=/")

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                pair = super().get_request()
                rec.accepted += 1
                return pair

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def seen(self) -> tuple[int, list[tuple[str, dict]]]:
        """(connections, requests) since the last call, probes left out. A probe connection is made and
        waited for first: connections are accepted in order, so any earlier one has been counted."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"GET {_PROBE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            while s.recv(65536):
                pass
        accepted, self.accepted = self.accepted - 1, 0
        reqs = [r for r in self.requests if r[0] != _PROBE]
        self.requests = []
        return accepted, reqs

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class LabelStudio:
    """A real HTTP server playing Label Studio: /data/upload/ needs the token; /redirect?to=<url> answers
    302 with that Location verbatim; /tasks/<id>/presign/ redirects to `presign_to`; /drip, /huge-length
    and /odd-length misbehave."""

    def __init__(self, photo: bytes):
        self.presign_to = ""
        self.requests: list[tuple[str, str | None]] = []
        ls = self

        class Handler(_Quiet):
            def do_GET(self):
                auth = self.headers.get("Authorization")
                ls.requests.append((self.path, auth))
                path, _, query = self.path.partition("?")
                if path.startswith("/data/upload/"):
                    if auth != f"Token {TOKEN}":
                        return self._send(401, b"no")
                    return self._send(200, photo, Content_Type="image/jpeg")
                if path == "/redirect":
                    return self._send(302, Location=parse_qs(query)["to"][0])
                if path.startswith("/tasks/") and path.endswith("/presign/"):
                    return self._send(302, Location=ls.presign_to)
                if path == "/drip":          # 40 bytes, one every 0.25 s: each read is quick, the whole is not
                    self.send_response(200)
                    self.send_header("Content-Length", "40")
                    self.end_headers()
                    try:
                        for _ in range(40):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.25)
                    except OSError:
                        pass
                    return
                if path == "/huge-length":
                    return self._send(200, b"abc", Content_Length="9" * 5000)
                if path == "/odd-length":
                    return self._send(200, b"abc", Content_Length="\u00b2")     # latin-1 superscript two
                return self._send(404, b"not found")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def photo(horse_dir) -> bytes:
    return (horse_dir / "images" / f"{horse_stems('test')[0]}.jpg").read_bytes()


@pytest.fixture(scope="module")
def ls(photo):
    srv = LabelStudio(photo)
    yield srv
    srv.close()


@pytest.fixture()
def other(photo):
    srv = Listener(photo)
    yield srv
    srv.close()


def _fetcher(**kw) -> ImageFetcher:
    return ImageFetcher(Settings.from_env(env={}, **kw))


def _refused(fetcher: ImageFetcher, url: str, match: str, **kw) -> str:
    with pytest.raises(ImageFetchError, match=match) as err:
        fetcher.fetch_bytes(url, **kw)
    msg = str(err.value)
    assert TOKEN not in msg and "internal error" not in msg and len(msg) < 600, msg
    return msg


# -- the normal case: Label Studio with its token -----------------------------------------------------
def test_label_studio_fetch_sends_the_token_there_only(ls, other):
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    assert f.load("/data/upload/1/a.jpg").ndim == 3
    assert ls.requests[-1] == ("/data/upload/1/a.jpg", f"Token {TOKEN}")
    # the full URL, the scheme in capitals, and localhost for 127.0.0.1: still Label Studio
    assert f.load(f"HTTP://127.0.0.1:{ls.port}/data/upload/1/b.jpg").ndim == 3
    assert ls.requests[-1] == ("/data/upload/1/b.jpg", f"Token {TOKEN}")
    g = _fetcher(label_studio_url=f"http://localhost:{ls.port}")
    assert g.load(f"http://127.0.0.1:{ls.port}/data/upload/1/c.jpg", api_key=TOKEN).ndim == 3
    assert ls.requests[-1] == ("/data/upload/1/c.jpg", f"Token {TOKEN}")
    assert other.seen() == (0, [])


# -- URLs whose host two parsers read differently --------------------------------------------------------
def test_backslash_trick_never_connects_and_names_the_real_host(ls, other):
    # urllib.parse reads host 127.0.0.1:<ls port> (Label Studio); urllib3 connects to the listener
    url = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{ls.port}/data/upload/1/x.jpg"
    for settings in ({}, {"allowed_hosts": ["*"]}):
        f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN, **settings)
        msg = _refused(f, url, "malformed: it contains a backslash")
        assert msg.startswith(f"http://127.0.0.1:{other.port}/"), msg      # where it would have gone
        assert other.seen() == (0, [])
    # the same with the token from /setup, and towards the cloud metadata address
    f = _fetcher()
    _refused(f, url, "backslash", ls_url=ls.url, api_key=TOKEN)
    _refused(f, f"http://169.254.169.254\\@127.0.0.1:{ls.port}/latest/meta-data/", "backslash",
             ls_url=ls.url, api_key=TOKEN)
    assert other.seen() == (0, [])


def test_userinfo_and_fragment_tricks(ls, other):
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN, allowed_hosts=["*"])
    _refused(f, f"http://user:pass@127.0.0.1:{other.port}/x.jpg", r"user name or password")
    _refused(f, f"http://127.0.0.1:{ls.port}@127.0.0.1:{other.port}/x.jpg", r"user name or password")
    assert other.seen() == (0, [])
    # '#' ends the authority for both parsers: the host is the listener's, and it is named
    g = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    msg = _refused(g, f"http://127.0.0.1:{other.port}#@127.0.0.1:{ls.port}/x.jpg", "is not allowed")
    assert f"127.0.0.1:{other.port}" in msg and f":{ls.port}" not in msg
    assert other.seen() == (0, [])


@pytest.mark.parametrize("make, reason", [
    (lambda p: f"http://127.0.0.1:{p}/x.jpg\r\nX-Injected: 1", "control character or white space"),
    (lambda p: f"http://127.0.0.1:{p}\t/x.jpg", "control character or white space"),
    (lambda p: f"http://127.0.0.1 :{p}/x.jpg", "control character or white space"),
    (lambda p: f"http://127.0.0.%31:{p}/x.jpg", "percent-encoded"),
    (lambda p: f"http://2130706433:{p}/x.jpg", "a.b.c.d"),                # 127.0.0.1 as one number
    (lambda p: f"http://0177.0.0.1:{p}/x.jpg", "a.b.c.d"),                # octal
    (lambda p: f"http://0x7f.0.0.1:{p}/x.jpg", "a.b.c.d"),                # hex
    (lambda p: f"http://127.1:{p}/x.jpg", "a.b.c.d"),
    (lambda p: f"http://localhost.:{p}/x.jpg", "ends with a dot"),
    (lambda p: f"http://ｌocalhost:{p}/x.jpg", "not plain ASCII"),
    (lambda p: f"http://[::ffff:127.0.0.1%25lo]:{p}/x.jpg", "IPv6|percent"),
    (lambda p: "http://127.0.0.1:99999/x.jpg", "cannot be parsed"),
    (lambda p: "http://127.0.0.1:0/x.jpg", "port is 0"),
    (lambda p: f"http://:{p}/x.jpg", "no host"),
    (lambda p: "http:///x.jpg", "no host"),
    (lambda p: f"http://127.0.0.1:{p}:{p}/x.jpg", "cannot be parsed"),
])
def test_malformed_urls_are_refused_before_connecting(ls, other, make, reason):
    """Even where every host is allowed ("*"), a URL the parsers could read differently is never fetched."""
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN, allowed_hosts=["*"])
    msg = _refused(f, make(other.port), reason)
    assert "malformed" in msg and "\r" not in msg and "\n" not in msg and "\t" not in msg
    assert other.seen() == (0, [])


def test_scheme_relative_and_other_schemes_are_not_fetched(ls, other):
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN, allowed_hosts=["*"])
    _refused(f, f"//127.0.0.1:{other.port}/x.jpg", "unsupported image URL")
    _refused(f, f"ftp://127.0.0.1:{other.port}/x.jpg", "unsupported image URL")
    assert other.seen() == (0, [])


def test_ipv6_literal_is_checked_as_written(ls, other):
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    msg = _refused(f, f"http://[::1]:{other.port}/x.jpg", "is not allowed")
    assert f"[::1]:{other.port}" in msg
    msg = _refused(f, f"http://[0:0::1]:{ls.port}/data/upload/1/x.jpg", "is not allowed")   # not 127.0.0.1
    assert f"[0:0::1]:{ls.port}" in msg
    assert other.seen() == (0, [])


def test_token_needs_the_same_scheme_host_and_port(ls, other):
    # Label Studio on https at the listener's port: a plain-http URL to that port must not carry the token
    f = _fetcher(label_studio_url=f"https://127.0.0.1:{other.port}", label_studio_api_key=TOKEN)
    _refused(f, f"http://127.0.0.1:{other.port}/data/upload/1/x.jpg", "is not allowed")
    assert other.seen() == (0, [])
    g = _fetcher(label_studio_url=f"https://127.0.0.1:{other.port}", label_studio_api_key=TOKEN,
                 allowed_hosts=[f"127.0.0.1:{other.port}"])
    assert g.load(f"http://127.0.0.1:{other.port}/data/upload/1/x.jpg").ndim == 3
    n, reqs = other.seen()
    assert n == 1 and reqs[0][0] == "/data/upload/1/x.jpg" and "authorization" not in reqs[0][1]
    # another port on Label Studio's host is another service: no token, and not allowed unless listed
    h = _fetcher(label_studio_url=f"http://localhost:{ls.port}", label_studio_api_key=TOKEN,
                 allowed_hosts=[f"localhost:{other.port}"])
    assert h.load(f"http://localhost:{other.port}/img.jpg").ndim == 3
    assert h.load(f"http://localhost:{other.port}/img2.jpg").ndim == 3
    n, reqs = other.seen()
    assert n >= 1 and len(reqs) == 2 and not any("authorization" in r[1] for r in reqs)
    assert "cookie" not in reqs[1][1]           # no cookies kept from one fetch to the next


# -- redirects ---------------------------------------------------------------------------------------
def _redirect(ls, to: str) -> str:
    return f"{ls.url}/redirect?to={quote(to, safe='')}"


def test_redirects_are_checked_like_urls(ls, other):
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    sneaky = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{ls.port}/data/upload/1/x.jpg"
    _refused(f, _redirect(ls, sneaky), "redirect target is malformed: it contains a backslash")
    _refused(f, _redirect(ls, f"http://u:p@127.0.0.1:{ls.port}/data/upload/1/x.jpg"), "user name or password")
    msg = _refused(f, _redirect(ls, f"http://127.0.0.1:{other.port}/x.jpg"), "redirected to a host that is not allowed")
    assert f"127.0.0.1:{other.port}" in msg
    _refused(f, _redirect(ls, f"//127.0.0.1:{other.port}/x.jpg"), "redirected to a host that is not allowed")
    _refused(f, _redirect(ls, "file:///etc/passwd"), "only http:// and https://")
    assert other.seen() == (0, [])
    # a redirect inside Label Studio keeps the token; to an allowed host it goes without it
    assert f.load(_redirect(ls, "/data/upload/1/y.jpg")).ndim == 3
    assert ls.requests[-1] == ("/data/upload/1/y.jpg", f"Token {TOKEN}")
    g = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN, allowed_hosts=[f"127.0.0.1:{other.port}"])
    assert g.load(_redirect(ls, f"http://127.0.0.1:{other.port}/z.jpg")).ndim == 3
    n, reqs = other.seen()
    assert n == 1 and reqs[0][0] == "/z.jpg" and "authorization" not in reqs[0][1]


def test_presign_redirect_chain(ls, other):
    """follow_any: the signed URL may be on any host, but is still parsed strictly and never gets the token."""
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    ls.presign_to = f"http://127.0.0.1:{other.port}/bucket/a.jpg?X-Amz-Signature=abc"
    assert f.load("s3://bucket/a.jpg", task_id=3).ndim == 3
    assert ls.requests[-1][0].startswith("/tasks/3/presign/?fileuri=") and ls.requests[-1][1] == f"Token {TOKEN}"
    n, reqs = other.seen()
    assert n == 1 and reqs[0][0] == "/bucket/a.jpg?X-Amz-Signature=abc" and "authorization" not in reqs[0][1]
    ls.presign_to = f"http://127.0.0.1:{other.port}\\@127.0.0.1:{ls.port}/data/upload/1/a.jpg"
    msg = _refused(f, "s3://bucket/a.jpg?versionId=7", "redirect target is malformed", task_id=3)
    assert msg.startswith("s3://bucket/a.jpg:") and "versionId" not in msg
    ls.presign_to = f"http://{TOKEN}@127.0.0.1:{other.port}/a.jpg"
    _refused(f, "s3://bucket/a.jpg", "user name or password", task_id=3)
    assert other.seen() == (0, [])
    _refused(f, "gs://bucket/a.jpg", "task id 'seven' is not a number", task_id="seven")


# -- messages ----------------------------------------------------------------------------------------
def test_messages_are_bounded_and_hold_no_secret(ls, other):
    f = _fetcher(label_studio_url=ls.url, label_studio_api_key=TOKEN)
    huge = f"http://127.0.0.1:{other.port}/" + "a" * (2 * 1024 * 1024) + ".jpg"
    _refused(f, huge, "characters long")
    long_ok = f"http://127.0.0.1:{other.port}/" + "b" * 10_000 + ".jpg?sig=s3cr3t"
    msg = _refused(f, long_ok, "is not allowed")
    assert "…" in msg and "sig" not in msg and "s3cr3t" not in msg
    msg = _refused(f, f"http://127.0.0.1:{other.port}/{TOKEN}/x.jpg", "is not allowed")
    assert "<token>" in msg
    assert other.seen() == (0, [])
    assert len(safe_url(huge)) <= 200 and safe_url(huge).endswith("…")
    assert safe_url("http://a.org/x\r\ny.jpg") == "http://a.org/x%0D%0Ay.jpg"
    real = f"http://127.0.0.1:{other.port}/%5C@ls.org/x.jpg"            # the host urllib3 would contact
    assert safe_url(f"http://127.0.0.1:{other.port}\\@ls.org/x.jpg") == real
    assert safe_url("s3://bucket/key.jpg?versionId=1") == "s3://bucket/key.jpg"
    assert safe_url("/data/local-files/?d=a%0Ab.jpg") == "/data/local-files/?d=a\\nb.jpg"


# -- bodies --------------------------------------------------------------------------------------------
def test_slow_drip_body_is_cut_at_the_fetch_timeout(ls):
    f = _fetcher(label_studio_url=ls.url, fetch_timeout=1.0)
    start = time.monotonic()
    _refused(f, ls.url + "/drip", r"took longer than 1 s")
    # budget: the 1 s limit plus a generous margin, well below the 10 s the drip lasts
    assert time.monotonic() - start < 5.0


def test_bad_content_length(ls):
    f = _fetcher(label_studio_url=ls.url, max_image_bytes=1_000_000)
    _refused(f, ls.url + "/huge-length", "is over the limit of 1,000,000")
    _refused(f, ls.url + "/odd-length", "invalid Content-Length")
