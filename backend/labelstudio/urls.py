"""Parsing and checking photo URLs before any connection: one parse (urllib3's, the one the HTTP client
connects with) for the check and the request; hosts, ports and schemes that are refused; the URL as
shown in a message (:func:`safe_url`: no query, no credentials, cut short).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from urllib3.util import Url, parse_url

log = logging.getLogger(__name__)


_IPV6_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")
CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


_MAX_SHOWN = 200                 # characters of a URL or path echoed in a message


_MAX_URL_CHARS = 64 * 1024       # longer http(s) URLs are refused unread


_LOCALHOST_PAIRS = ({"localhost", "127.0.0.1"}, {"localhost", "::1"})   # what localhost resolves to


_DEFAULT_PORT = {"http": 80, "https": 443}


_NAME_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


ALL_DIGITS = re.compile(r"[0-9]+")


# -- showing URLs and paths in messages ---------------------------------------------------------
def clip_shown(text: str, limit: int = _MAX_SHOWN) -> str:
    """`text` with control and other unprintable characters escaped, cut to `limit` characters."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[: limit + 1])
    return shown if len(text) <= limit and len(shown) <= limit else shown[: limit - 1] + "…"


def safe_url(url: str) -> str:
    """The URL without query string and credentials, at most 200 characters, for logs and error
    messages; ``/data/local-files/?d=x`` keeps its ``d`` (a path, not a secret). An http(s) URL is
    shown with the host its request would really go to."""
    if not isinstance(url, str):
        return "<not a URL>"
    text = url.strip()[: _MAX_URL_CHARS + 1]
    try:
        if text.lower().startswith(("http://", "https://")):
            p = parse_url(text)
            port = f":{p.port}" if p.port is not None else ""
            head, path, query = f"{p.scheme}://{p.host or ''}{port}", p.path or "", p.query or ""
        else:
            s = urlsplit(text)
            netloc = s.netloc.rpartition("@")[2]
            head = f"{s.scheme}://{netloc}" if s.scheme else (f"//{netloc}" if netloc else "")
            path, query = s.path, s.query
    except ValueError:                           # LocationParseError is one too
        return "<malformed URL>"
    if "/data/local-files" in path:
        d = parse_qs(query).get("d")
        return clip_shown(f"{head}{path}?d={d[-1]}" if d else head + path)
    return clip_shown(head + path)


# -- one parse of an http(s) URL, the one the client connects with ------------------------------
class MalformedURL(ValueError):
    """An http(s) URL refused unread; the message is the reason, a clause ("it contains ...")."""


@dataclass(frozen=True)
class Target:
    """Where a request goes, as urllib3 (hence requests) will connect: scheme, host, port."""
    scheme: str
    host: str                    # lowercase; IPv6 in brackets, as in a URL
    port: int | None             # as written (None: the scheme's default)
    path: str
    query: str | None

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else _DEFAULT_PORT[self.scheme]

    @property
    def host_key(self) -> str:
        """The host for comparisons: IP literals in canonical form, names as written."""
        return _host_key(self.host)

    @property
    def shown(self) -> str:
        """host:port, as connected to (for messages)."""
        return f"{self.host}:{self.effective_port}"

    @property
    def url(self) -> str:
        return Url(scheme=self.scheme, host=self.host, port=self.port, path=self.path or "/",
                   query=self.query).url

    def same_origin(self, other: "Target") -> bool:
        """Same scheme, same host (``localhost`` as 127.0.0.1 or ::1) and same effective port."""
        a, b = self.host_key, other.host_key
        return self.scheme == other.scheme and self.effective_port == other.effective_port and \
            (a == b or {a, b} in _LOCALHOST_PAIRS)


def _host_key(host: str) -> str:
    bare = host[1:-1] if host.startswith("[") else host
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        return bare


def _check_host(host: str) -> None:
    """`host` (lowercase, from urllib3) is a plain DNS name, a dotted-quad IPv4 or a bracketed IPv6."""
    if host.startswith("["):
        if not _IPV6_LITERAL.fullmatch(host):
            raise MalformedURL(f"its host {clip_shown(host, 80)!r} is not a plain IPv6 address")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise MalformedURL(f"its host {clip_shown(host, 80)!r} is not a valid IPv6 address") from None
        return
    if "%" in host:
        raise MalformedURL("its host is percent-encoded")
    if host.endswith("."):
        raise MalformedURL(f"its host {clip_shown(host, 80)!r} ends with a dot")
    labels = host.split(".")
    if len(host) > 253 or not all(_NAME_LABEL.fullmatch(label) for label in labels):
        raise MalformedURL(f"its host {clip_shown(host, 80)!r} is not a plain host name")
    # the resolver reads 2130706433, 127.1, 0x7f.0.0.1 and 0177.0.0.1 (octal) as IPv4 addresses, as
    # inet_aton does: of those only the plain a.b.c.d form is let through
    try:
        socket.inet_aton(host)
    except OSError:
        return                                   # a name, not a number
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise MalformedURL(f"its host {clip_shown(host, 80)!r} is not an IPv4 address written as a.b.c.d") from None


def parse_target(url: str) -> Target:
    """The request target of an absolute http(s) URL, or MalformedURL."""
    if len(url) > _MAX_URL_CHARS:
        raise MalformedURL(f"it is {len(url):,} characters long (at most {_MAX_URL_CHARS:,} are accepted)")
    if "\\" in url:
        raise MalformedURL("it contains a backslash")
    if any(ord(c) < 32 or ord(c) == 127 or c.isspace() for c in url):
        raise MalformedURL("it contains a control character or white space")
    scheme = url.partition(":")[0].lower()
    if scheme not in _DEFAULT_PORT or not url[len(scheme) + 1:].startswith("//"):
        raise MalformedURL("only http:// and https:// URLs can be downloaded")
    try:
        std = urlsplit(url)
        std_host, std_port = std.hostname, std.port
    except ValueError:
        raise MalformedURL("it cannot be parsed") from None
    if "%" in std.netloc:
        raise MalformedURL("its host is percent-encoded")
    if "@" in std.netloc:
        raise MalformedURL("it carries a user name or password (user:pass@)")
    if std_host and not std_host.isascii():
        raise MalformedURL("its host is not plain ASCII (write an international name in its xn-- form)")
    try:
        p = parse_url(url)
    except ValueError:
        raise MalformedURL("it cannot be parsed (is the port a number up to 65535?)") from None
    if p.auth is not None:
        raise MalformedURL("it carries a user name or password (user:pass@)")
    host = (p.host or "").lower()
    if not host:
        raise MalformedURL("it has no host")
    _check_host(host)
    if p.port == 0:
        raise MalformedURL("its port is 0")
    target = Target(scheme=p.scheme, host=host, port=p.port, path=p.path or "/", query=p.query)
    # belt and braces: the standard library's parser must read the same host and port
    if std_host is None or _host_key(std_host) != target.host_key or std_port != p.port:
        raise MalformedURL("URL parsers disagree on its host")
    return target


def allowed_entry(entry: str) -> tuple[str, int | None] | None:
    """A TAG2MASK_ALLOWED_HOSTS entry ("host", "host:port", "[v6]", "[v6]:port", "v6") as
    (host key, port or None), or None when it cannot be read (or is "*")."""
    entry = entry.strip().lower()
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif entry.count(":") == 1:
        host, _, p = entry.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    if not host or host == "*":
        return None
    return _host_key(host), port
