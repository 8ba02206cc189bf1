"""Task image URL -> photo (RGB uint8), with guards: local roots, allowed hosts, size cap, timeouts.

Public API::

    fetcher = ImageFetcher(settings)                       # backend.settings.Settings
    data = fetcher.fetch_bytes(url, task_id=None, ls_url=None, api_key=None)   # -> bytes
    image = fetcher.load(url, task_id=None, ls_url=None, api_key=None)         # -> (H, W, 3) uint8
    # every failure: ImageFetchError (message safe to show: no token, no query string)

URL kinds (what Label Studio puts in ``task["data"]["image"]``):

- ``/data/local-files/?d=<path>``: read from disk when TAG2MASK_LOCAL_ROOTS is set (``<path>`` is taken
  relative to each root, or as an absolute path inside one; ``..`` parts and symlinks leading out of
  the roots are refused); otherwise fetched from Label Studio with ``Authorization: Token <key>``.
- ``/data/upload/...`` (and ``upload/...``): fetched from Label Studio with the token.
- ``s3://``, ``gs://``, ``azure-blob://``: through Label Studio's presign endpoint
  ``/tasks/<task_id>/presign/?fileuri=<base64url>`` (the SDK's ``encode_presign_fileuri``), which
  redirects to a signed URL.
- ``http(s)://host/...``: only from Label Studio's host or a host in TAG2MASK_ALLOWED_HOSTS (``*``:
  any); the token is sent only to Label Studio's host; redirects are followed (at most 3) only to
  allowed hosts.
- a plain absolute path or ``file://`` URL: only inside TAG2MASK_LOCAL_ROOTS.

Downloads are streamed and cut at TAG2MASK_MAX_IMAGE_BYTES; decoding is explainers.imageio.load_image
(its pixel cap applies).
"""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import numpy as np
import requests

from backend.settings import Settings
from explainers.errors import ImageLoadError
from explainers.imageio import load_image

__all__ = ["ImageFetchError", "ImageFetcher", "safe_url"]

log = logging.getLogger(__name__)

_CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")
_MAX_REDIRECTS = 3


class ImageFetchError(Exception):
    """A task photo that cannot be read; the message names the photo but never a token or query."""


def safe_url(url: str) -> str:
    """The URL without query string and credentials (for logs and error messages);
    ``/data/local-files/?d=x`` keeps its ``d`` (a path, not a secret)."""
    try:
        p = urlparse(url)
    except ValueError:
        return "<unparsable url>"
    if "/data/local-files" in p.path:
        d = parse_qs(p.query).get("d")
        return f"{p.path}?d={d[-1]}" if d else p.path
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}" if p.scheme else p.path


def _host_of(url: str) -> str:
    p = urlparse(url)
    host = (p.hostname or "").lower()
    return f"{host}:{p.port}" if p.port else host


class ImageFetcher:
    """Fetches task photos according to :class:`Settings` (one instance can serve many threads)."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.roots = [Path(r).resolve() for r in self.settings.local_roots]
        self.session = requests.Session()
        self.session.trust_env = False   # no proxy / netrc credentials leaking into fetches

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
        ls_url = (self.settings.label_studio_url or ls_url or "").rstrip("/") or None
        api_key = self.settings.label_studio_api_key or api_key
        low = url.lower()

        if low.startswith(_CLOUD_PREFIXES):
            return self._from_cloud(url, task_id, ls_url, api_key)
        if low.startswith(("http://", "https://")):
            parsed = urlparse(url)
            if "/data/local-files" in parsed.path and self.roots and self._is_ls(url, ls_url):
                return self._read_local(self._local_files_path(url))
            return self._download(url, ls_url, api_key)
        if low.startswith("file://"):
            return self._read_local(self._inside_roots(unquote(urlparse(url).path)))
        if url.startswith("/data/local-files") or url.startswith("data/local-files"):
            if self.roots:
                return self._read_local(self._local_files_path(url))
            return self._download(self._on_ls(url, ls_url), ls_url, api_key)
        if url.startswith(("/data/", "data/", "/upload/", "upload/", "/storage-data/")):
            path = url.lstrip("/")
            if path.startswith("upload/"):
                path = "data/" + path
            return self._download(self._on_ls("/" + path, ls_url), ls_url, api_key)
        if url.startswith("/") and not url.startswith("//"):
            return self._read_local(self._inside_roots(url))
        raise ImageFetchError(f"unsupported image URL {safe_url(url)!r}")

    # -- local files ----------------------------------------------------------------------------
    def _local_files_path(self, url: str) -> Path:
        values = parse_qs(urlparse(url).query, keep_blank_values=True).get("d")
        rel = values[-1] if values else ""
        if not rel:
            raise ImageFetchError("local-files URL without a ?d= path")
        return self._inside_roots(rel, relative_ok=True)

    def _inside_roots(self, path: str, relative_ok: bool = False) -> Path:
        """The real path of `path` if it lies inside a configured root, else ImageFetchError."""
        if not self.roots:
            raise ImageFetchError(f"{path}: reading local files is disabled (set TAG2MASK_LOCAL_ROOTS)")
        if ".." in Path(path).parts:
            raise ImageFetchError(f"{path}: '..' is not allowed in a local file path")
        candidates = []
        p = Path(path)
        if p.is_absolute():
            candidates.append(p)
        if relative_ok or not p.is_absolute():
            candidates += [root / str(path).lstrip("/") for root in self.roots]
        outside = False
        for cand in candidates:
            real = cand.resolve()
            if not any(real == r or r in real.parents for r in self.roots):
                outside = outside or cand.exists()
                continue
            if real.is_file():
                return real
        if outside:
            raise ImageFetchError(f"{path}: outside the allowed local roots")
        raise ImageFetchError(f"{path}: no such file under the local roots")

    def _read_local(self, path: Path) -> bytes:
        cap = self.settings.max_image_bytes
        try:
            size = path.stat().st_size
            if size > cap:
                raise ImageFetchError(f"{path.name}: {size:,} bytes is over the limit of {cap:,} (TAG2MASK_MAX_IMAGE_BYTES)")
            return path.read_bytes()
        except OSError as exc:
            raise ImageFetchError(f"{path.name}: cannot read ({exc.strerror or type(exc).__name__})") from None

    # -- remote ---------------------------------------------------------------------------------
    def _on_ls(self, path: str, ls_url: str | None) -> str:
        if not ls_url:
            raise ImageFetchError(f"{safe_url(path)}: Label Studio's URL is unknown (set LABEL_STUDIO_URL)")
        return ls_url + "/" + path.lstrip("/")

    def _is_ls(self, url: str, ls_url: str | None) -> bool:
        if not ls_url:
            return False
        a, b = urlparse(url), urlparse(ls_url)
        local = {"localhost", "127.0.0.1", "::1"}
        same_host = (a.hostname or "").lower() == (b.hostname or "").lower() or \
            ((a.hostname or "").lower() in local and (b.hostname or "").lower() in local)
        return same_host and (a.port or (443 if a.scheme == "https" else 80)) == \
            (b.port or (443 if b.scheme == "https" else 80))

    def _allowed(self, url: str, ls_url: str | None) -> bool:
        if self._is_ls(url, ls_url):
            return True
        allowed = self.settings.allowed_hosts
        if "*" in allowed:
            return True
        host = _host_of(url)
        bare = (urlparse(url).hostname or "").lower()
        return host in allowed or bare in allowed

    def _from_cloud(self, uri: str, task_id, ls_url: str | None, api_key: str | None) -> bytes:
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import encode_presign_fileuri

        if task_id is None:
            raise ImageFetchError(f"{safe_url(uri)}: a cloud URI needs the task id for Label Studio's presign endpoint")
        presign = self._on_ls(f"/tasks/{int(task_id)}/presign/?fileuri={encode_presign_fileuri(uri)}", ls_url)
        # the presign endpoint redirects to a signed URL on the storage's host: follow it
        return self._download(presign, ls_url, api_key, follow_any=True, label=safe_url(uri))

    def _download(self, url: str, ls_url: str | None, api_key: str | None, follow_any: bool = False,
                  label: str | None = None) -> bytes:
        label = label or safe_url(url)
        if not self._allowed(url, ls_url):
            raise ImageFetchError(f"{label}: host {_host_of(url)!r} is not allowed "
                                  "(only Label Studio's host and TAG2MASK_ALLOWED_HOSTS)")
        timeout = self.settings.fetch_timeout
        cap = self.settings.max_image_bytes
        for _ in range(_MAX_REDIRECTS + 1):
            headers = {"User-Agent": "tag2mask-ml-backend"}
            if api_key and self._is_ls(url, ls_url):
                headers["Authorization"] = f"Token {api_key}"
            try:
                resp = self.session.get(url, headers=headers, timeout=(min(timeout, 10.0), timeout),
                                        stream=True, allow_redirects=False)
            except requests.RequestException as exc:
                raise ImageFetchError(f"{label}: download failed ({type(exc).__name__})") from None
            with resp:
                if resp.is_redirect:
                    nxt = urljoin(url, resp.headers.get("Location", ""))
                    if not (follow_any or self._allowed(nxt, ls_url)):
                        raise ImageFetchError(f"{label}: redirected to a host that is not allowed ({_host_of(nxt)!r})")
                    url = nxt
                    continue
                if resp.status_code != 200:
                    raise ImageFetchError(f"{label}: HTTP {resp.status_code} from {_host_of(url)}")
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > cap:
                    raise ImageFetchError(f"{label}: {int(length):,} bytes is over the limit of {cap:,} "
                                          "(TAG2MASK_MAX_IMAGE_BYTES)")
                chunks, total = [], 0
                try:
                    for chunk in resp.iter_content(chunk_size=256 * 1024):
                        total += len(chunk)
                        if total > cap:
                            raise ImageFetchError(f"{label}: more than {cap:,} bytes (TAG2MASK_MAX_IMAGE_BYTES)")
                        chunks.append(chunk)
                except requests.RequestException as exc:
                    raise ImageFetchError(f"{label}: download interrupted ({type(exc).__name__})") from None
                return b"".join(chunks)
        raise ImageFetchError(f"{label}: too many redirects")
