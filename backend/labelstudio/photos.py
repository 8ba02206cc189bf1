"""Task image URL -> photo (RGB uint8), with guards: local roots, allowed hosts, size cap, timeouts.

Public API::

    fetcher = ImageFetcher(settings)                       # backend.settings.Settings
    data = fetcher.fetch_bytes(url, task_id=None, ls_url=None, api_key=None)   # -> bytes
    image = fetcher.load(url, task_id=None, ls_url=None, api_key=None)         # -> (H, W, 3) uint8
    # every failure: ImageFetchError, a sentence safe to show: no token, no query string (but
    # local-files' ``d=``), URLs and paths cut to 200 characters, control characters escaped;
    # its ``retryable`` is True for network trouble (download failed / interrupted, HTTP 408/429/5xx)

URL kinds (what Label Studio puts in ``task["data"]["image"]``):

- ``/data/local-files/?d=<path>``: read from disk when TAG2MASK_LOCAL_ROOTS is set (``<path>`` is taken
  relative to each root, or as an absolute path inside one; ``..`` parts and symlinks leading out of
  the roots are refused; only regular files are read); otherwise fetched from Label Studio with
  ``Authorization: Token <key>``.
- ``/data/upload/...`` (and ``upload/...``): fetched from Label Studio with the token.
- ``s3://``, ``gs://``, ``azure-blob://``: through Label Studio's presign endpoint
  ``/tasks/<task_id>/presign/?fileuri=<base64url>`` (the SDK's ``encode_presign_fileuri``), which
  redirects to a signed URL (on any host: the redirect targets are still checked for being well formed).
- ``http(s)://host/...``: only from Label Studio's host or a host in TAG2MASK_ALLOWED_HOSTS (``*``:
  any); redirects are followed (at most 3) only to allowed hosts.
- a plain absolute path or ``file://`` URL: only inside TAG2MASK_LOCAL_ROOTS.

What is checked is what is connected to: every http(s) URL (the task's, Label Studio's, each redirect
``Location``) is parsed once (backend.labelstudio.urls: urllib3's parser, the one requests connects
with, and the refusals before any connection), the request is built from that parse and re-checked
after requests prepared it. The token is sent only when the
connection's scheme, host and port (default ports by scheme) are Label Studio's (``localhost``
matches ``127.0.0.1`` and ``[::1]``; those two do not match each other). No cookies are kept.

Downloads are streamed and cut at TAG2MASK_MAX_IMAGE_BYTES (``Accept-Encoding: identity`` is asked;
compressed bodies are counted decoded). TAG2MASK_FETCH_TIMEOUT is one deadline for one image, redirects
included: it bounds the connect, each read of the response headers, and the whole body (a body dripped
slowly is cut at the deadline). Decoding is explainers.imageio.load_image (its pixel cap applies).
"""

from __future__ import annotations

import errno
import http.client
import http.cookiejar
import logging
import os
import stat
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests
import urllib3
from requests.utils import requote_uri
from urllib3.util import parse_url

from backend.labelstudio.urls import (
    CLOUD_PREFIXES,
    ALL_DIGITS,
    allowed_entry,
    clip_shown,
    MalformedURL,
    parse_target,
    Target,
    safe_url,
)
from backend.settings import Settings
from explainers.errors import ImageLoadError
from explainers.imageio import load_image

__all__ = ["ImageFetchError", "ImageFetcher", "safe_url"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
_READ_CHUNK = 64 * 1024


class ImageFetchError(Exception):
    """A task photo that cannot be read; the message names the photo but never a token or query.
    ``retryable``: network trouble worth trying again (the download failed or broke off, HTTP
    408/429/5xx); every other refusal or failure would fail the same way again."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


# -- local paths ----------------------------------------------------------------------------------
def _os_reason(exc: OSError) -> str:
    """A sentence fragment for an OSError on a local path (never the path itself)."""
    reasons = {
        errno.ENAMETOOLONG: "the local file name is too long",
        errno.ENOENT: "no such file under the local roots",
        errno.ENOTDIR: "no such file under the local roots (a part of the path is not a folder)",
        errno.EISDIR: "it is a folder, not a photo file",
        errno.ELOOP: "the local path has too many levels of symbolic links",
        errno.EACCES: "permission to read the local file is denied",
        errno.EPERM: "permission to read the local file is denied",
    }
    return reasons.get(exc.errno) or f"the local file cannot be read ({exc.strerror or type(exc).__name__})"


def _path_problem(path: str) -> str | None:
    """Why `path` cannot name a local file at all (None: it can)."""
    if "\0" in path:
        return "the local file path contains a NUL character"
    try:
        os.fsencode(path)
    except UnicodeError:
        return "the local file path is not valid text (it holds an unpaired surrogate character)"
    return None


class ImageFetcher:
    """Fetches task photos according to :class:`Settings` (one instance can serve many threads)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.roots = [Path(r).resolve() for r in self.settings.local_roots]
        self.allow_any = "*" in self.settings.allowed_hosts
        self.allowed = [a for a in map(allowed_entry, self.settings.allowed_hosts) if a]
        self.session = requests.Session()
        self.session.trust_env = False   # no proxy / netrc credentials leaking into fetches
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # keep none

    # -- public ---------------------------------------------------------------------------------
    def load(self, url: str, task_id=None, ls_url: str | None = None, api_key: str | None = None) -> np.ndarray:
        data = self.fetch_bytes(url, task_id=task_id, ls_url=ls_url, api_key=api_key)
        try:
            return load_image(data, name=safe_url(url))
        except ImageLoadError as exc:
            raise ImageFetchError(str(exc)) from None

    def fetch_bytes(self, url: str, task_id=None, ls_url: str | None = None, api_key: str | None = None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("the task has no image URL")
        url = url.strip()
        ls_url = self.settings.label_studio_url or (ls_url if isinstance(ls_url, str) else None)
        ls_url = (ls_url or "").strip().rstrip("/") or None
        api_key = self.settings.label_studio_api_key or (api_key if isinstance(api_key, str) else None)
        try:
            return self._fetch(url, task_id, ls_url, api_key)
        except ImageFetchError as exc:
            if api_key and len(api_key) >= 8 and api_key in str(exc):    # a URL that happens to carry it
                raise ImageFetchError(str(exc).replace(api_key, "<token>"), retryable=exc.retryable) from None
            raise

    def _fetch(self, url: str, task_id, ls_url: str | None, api_key: str | None) -> bytes:
        low = url.lower()
        if low.startswith(CLOUD_PREFIXES):
            return self._from_cloud(url, task_id, ls_url, api_key)
        if low.startswith(("http://", "https://")):
            target = self._target(url, safe_url(url))
            if "/data/local-files" in target.path and self.roots and self._is_ls(target, ls_url):
                return self._read_local(self._local_files_path(target.query or ""))
            return self._download(target, ls_url, api_key)
        if low.startswith("file://"):
            try:
                path = unquote(urlsplit(url).path)
            except ValueError:
                raise ImageFetchError(f"the file URL {safe_url(url)!r} is malformed") from None
            return self._read_local(self._inside_roots(path))
        if url.startswith(("/data/local-files", "data/local-files")):
            if self.roots:
                return self._read_local(self._local_files_path(url.partition("?")[2]))
            return self._download(self._on_ls(url, ls_url), ls_url, api_key)
        if url.startswith(("/data/", "data/", "/upload/", "upload/", "/storage-data/")):
            path = url.lstrip("/")
            if path.startswith("upload/"):
                path = "data/" + path
            return self._download(self._on_ls("/" + path, ls_url), ls_url, api_key)
        if url.startswith("/") and not url.startswith("//"):
            return self._read_local(self._inside_roots(url))
        raise ImageFetchError(f"unsupported image URL {safe_url(url)!r} (expected http(s)://, /data/..., "
                              "s3://, gs://, azure-blob://, file:// or an absolute path)")

    # -- local files ----------------------------------------------------------------------------
    def _local_files_path(self, query: str) -> Path:
        values = parse_qs(query, keep_blank_values=True).get("d")
        rel = values[-1] if values else ""
        if not rel:
            raise ImageFetchError("local-files URL without a ?d= path")
        return self._inside_roots(rel, relative_ok=True)

    def _inside_roots(self, path: str, relative_ok: bool = False) -> Path:
        """The real path of `path` if it is a regular file inside a configured root, else ImageFetchError."""
        shown = clip_shown(path)
        if not self.roots:
            raise ImageFetchError(f"{shown}: reading local files is disabled (set TAG2MASK_LOCAL_ROOTS)")
        problem = _path_problem(path)
        if problem:
            raise ImageFetchError(f"{shown}: {problem}")
        p = Path(path)
        if ".." in p.parts:
            raise ImageFetchError(f"{shown}: '..' is not allowed in a local file path")
        candidates = [p] if p.is_absolute() else []
        if relative_ok or not p.is_absolute():
            candidates += [root / path.lstrip("/") for root in self.roots]
        outside, not_file, error = False, None, None
        for cand in candidates:
            try:
                real = cand.resolve()
                if not any(real == r or r in real.parents for r in self.roots):
                    outside = outside or cand.exists()
                    continue
                if real.is_file():
                    return real
                if real.exists():
                    not_file = not_file or ("it is a folder, not a photo file" if real.is_dir()
                                            else "not a regular file")
            except OSError as exc:
                error = error or exc
        if outside:
            raise ImageFetchError(f"{shown}: outside the allowed local roots")
        if not_file:
            raise ImageFetchError(f"{shown}: {not_file}")
        if error is not None:
            raise ImageFetchError(f"{shown}: {_os_reason(error)}")
        raise ImageFetchError(f"{shown}: no such file under the local roots")

    def _read_local(self, path: Path) -> bytes:
        """The bytes of regular file `path`, at most TAG2MASK_MAX_IMAGE_BYTES (never blocks on a FIFO)."""
        cap, shown = self.settings.max_image_bytes, clip_shown(path.name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise ImageFetchError(f"{shown}: {_os_reason(exc)}") from None
        with os.fdopen(fd, "rb") as f:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise ImageFetchError(f"{shown}: not a regular file")
                if st.st_size > cap:
                    raise ImageFetchError(f"{shown}: {st.st_size:,} bytes is over the limit of {cap:,} "
                                          "(TAG2MASK_MAX_IMAGE_BYTES)")
                data = f.read(cap + 1)
            except OSError as exc:
                raise ImageFetchError(f"{shown}: {_os_reason(exc)}") from None
        if len(data) > cap:
            raise ImageFetchError(f"{shown}: more than {cap:,} bytes (TAG2MASK_MAX_IMAGE_BYTES)")
        return data

    # -- remote ---------------------------------------------------------------------------------
    @staticmethod
    def _target(url: str, label: str, what: str = "the image URL") -> Target:
        try:
            return parse_target(url)
        except MalformedURL as exc:
            raise ImageFetchError(f"{label}: {what} is malformed: {exc}; it was refused without "
                                  "connecting anywhere") from None

    @staticmethod
    def _ls_target(ls_url: str | None) -> Target | None:
        try:
            return parse_target(ls_url) if ls_url else None
        except MalformedURL:
            return None

    def _on_ls(self, path: str, ls_url: str | None) -> Target:
        """`path` (from the task) on Label Studio's host; spaces and the like in it are percent-encoded."""
        if not ls_url:
            raise ImageFetchError(f"{safe_url(path)}: Label Studio's URL is unknown (set LABEL_STUDIO_URL)")
        try:
            parse_target(ls_url)
        except MalformedURL as exc:
            raise ImageFetchError(f"Label Studio's URL (LABEL_STUDIO_URL or /setup's hostname) is malformed: "
                                  f"{exc}") from None
        return self._target(requote_uri(ls_url + "/" + path.lstrip("/")), safe_url(path))

    def _is_ls(self, target: Target, ls_url: str | None) -> bool:
        ls = self._ls_target(ls_url)
        return ls is not None and target.same_origin(ls)

    def _allowed(self, target: Target, ls_url: str | None) -> bool:
        if self.allow_any or self._is_ls(target, ls_url):
            return True
        return any(host == target.host_key and port in (None, target.effective_port)
                   for host, port in self.allowed)

    def _from_cloud(self, uri: str, task_id, ls_url: str | None, api_key: str | None) -> bytes:
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
            encode_presign_fileuri,
        )

        label = safe_url(uri)
        if task_id is None:
            raise ImageFetchError(f"{label}: a cloud URI needs the task id for Label Studio's presign endpoint")
        try:
            tid = int(task_id)
        except (TypeError, ValueError):
            raise ImageFetchError(f"{label}: the task id {clip_shown(str(task_id), 40)!r} is not a number") from None
        presign = self._on_ls(f"/tasks/{tid}/presign/?fileuri={encode_presign_fileuri(uri)}", ls_url)
        # the presign endpoint redirects to a signed URL on the storage's host: follow it
        return self._download(presign, ls_url, api_key, follow_any=True, label=label)

    def _download(self, target: Target, ls_url: str | None, api_key: str | None, follow_any: bool = False,
                  label: str | None = None) -> bytes:
        label = label or safe_url(target.url)
        if not self._allowed(target, ls_url):
            raise ImageFetchError(f"{label}: host {target.shown!r} is not allowed "
                                  "(only Label Studio's host and TAG2MASK_ALLOWED_HOSTS)")
        deadline = time.monotonic() + self.settings.fetch_timeout
        for _ in range(_MAX_REDIRECTS + 1):
            token = api_key if api_key and self._is_ls(target, ls_url) else None
            resp = self._send(target, token, deadline, label)
            with resp:
                if resp.is_redirect:
                    target = self._next_hop(target, resp, label, follow_any, ls_url)
                    continue
                if resp.status_code != 200:
                    raise ImageFetchError(f"{label}: HTTP {resp.status_code} from {target.shown}",
                                          retryable=resp.status_code in (408, 429) or 500 <= resp.status_code <= 599)
                return self._read_body(resp, label, deadline)
        raise ImageFetchError(f"{label}: too many redirects (more than {_MAX_REDIRECTS})")

    def _send(self, target: Target, token: str | None, deadline: float, label: str) -> requests.Response:
        """GET `target` (no redirects followed, body not read yet), `token` as Authorization if given."""
        headers = {"User-Agent": "tag2mask-ml-backend", "Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Token {token}"
        prepared = self.session.prepare_request(requests.Request("GET", target.url, headers=headers))
        # requests re-parses the URL; connect only if that lands exactly where was checked
        again = parse_url(prepared.url)
        if (again.scheme, (again.host or "").lower(), again.port, again.auth) != \
                (target.scheme, target.host, target.port, None) or \
                prepared.headers.get("Authorization") != headers.get("Authorization"):
            raise ImageFetchError(f"{label}: the request to {target.shown} would not go where it was checked; "
                                  "refused")
        remaining = self._remaining(deadline, label)
        try:
            return self.session.send(prepared, stream=True, allow_redirects=False, proxies={},
                                     timeout=(min(remaining, 10.0), remaining))
        except requests.RequestException as exc:
            raise ImageFetchError(f"{label}: download failed ({type(exc).__name__} "
                                  f"from {target.shown})", retryable=True) from None

    def _next_hop(self, target: Target, resp: requests.Response, label: str, follow_any: bool,
                  ls_url: str | None) -> Target:
        location = resp.headers.get("Location", "")
        try:                                       # the header arrives latin-1 decoded; UTF-8 is usual
            location = location.encode("latin-1").decode("utf-8")
        except UnicodeError:
            pass
        if not location.strip():
            raise ImageFetchError(f"{label}: {target.shown} answered a redirect without a Location")
        nxt = self._target(urljoin(target.url, location.strip()), label, what="the redirect target")
        if not (follow_any or self._allowed(nxt, ls_url)):
            raise ImageFetchError(f"{label}: redirected to a host that is not allowed ({nxt.shown!r})")
        return nxt

    def _remaining(self, deadline: float, label: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageFetchError(f"{label}: download interrupted (it took longer than "
                                  f"{self.settings.fetch_timeout:g} s, TAG2MASK_FETCH_TIMEOUT)", retryable=True)
        return remaining

    def _read_body(self, resp: requests.Response, label: str, deadline: float) -> bytes:
        """The body of `resp`, cut at the size cap and at `deadline` (each socket read waits at most
        the time left)."""
        cap = self.settings.max_image_bytes
        length = _content_length(resp.headers.get("Content-Length"), label)
        if length is not None and length > cap:
            raise ImageFetchError(f"{label}: {length:,} bytes is over the limit of {cap:,} "
                                  "(TAG2MASK_MAX_IMAGE_BYTES)")
        raw = resp.raw
        read = getattr(raw, "read1", None) or raw.read
        chunks, total = [], 0
        while True:
            _set_read_timeout(raw, self._remaining(deadline, label))
            try:
                chunk = read(_READ_CHUNK, decode_content=True)
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                self._remaining(deadline, label)
                raise ImageFetchError(f"{label}: download interrupted ({type(exc).__name__})",
                                      retryable=True) from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > cap:
                raise ImageFetchError(f"{label}: more than {cap:,} bytes (TAG2MASK_MAX_IMAGE_BYTES)")
            chunks.append(chunk)


def _content_length(value: str | None, label: str) -> int | None:
    """The announced body size (None: not announced); huge values are capped at 10**18, and
    anything but ASCII digits (or a list of one repeated value) is refused."""
    if value is None:
        return None
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not ALL_DIGITS.fullmatch(next(iter(values))):
        raise ImageFetchError(f"{label}: the server sent an invalid Content-Length ({clip_shown(value, 40)!r})")
    digits = next(iter(values)).lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 10 ** 18


def _set_read_timeout(raw, seconds: float) -> None:
    """Make the next socket read of urllib3 response `raw` wait at most `seconds`."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.001))


