"""Values that come from requests: name their JSON type, shorten them for replies and logs, bound them.

Anything a request carries may be hostile (Label Studio's payloads are not the only possible
sender). These helpers turn such values into short, clear sentences instead of tracebacks:

    clip(value, limit=80) -> str         # a value for a reply or a log line: at most ~limit characters
    json_type(value) -> str              # "a string", "a number", "a list", "an object", "a boolean", "null"
    parse_json_body(raw) -> object       # bytes -> JSON value; BadInput (a sentence) when not acceptable
    json_depth(raw) -> int               # how deeply a JSON text nests ([ and {), without parsing it
    project_id(value, what) -> str|None  # a Label Studio project id, safe in file names and Redis keys
    task_id(value) -> int | str | None   # a task id: an integer 0..2^63-1 or a short plain string
    BadInput(ValueError)                 # the message is a sentence for the sender

Limits: a body nests at most MAX_JSON_DEPTH (64) levels (Label Studio's deepest, an annotation's
polygon points inside a webhook, is about 8); NaN / Infinity are not JSON and are refused; strings
with an unpaired UTF-16 surrogate (``"\\ud800"``) are refused, since they cannot be written as UTF-8
(logs, the event log, sqlite). A project id is "<id>" or "<id>.<created ts>" (what Label Studio
sends) with an id of at most 64 letters, digits, "_" or "-".
"""

from __future__ import annotations

import json
import re
import reprlib

import numpy as np

__all__ = ["BadInput", "clip", "json_type", "parse_json_body", "json_depth", "project_id", "task_id",
           "MAX_JSON_DEPTH", "MAX_ID_CHARS"]

MAX_JSON_DEPTH = 64
MAX_ID_CHARS = 64
MAX_DB_ID = 2 ** 63 - 1          # Label Studio's ids are 64-bit database keys

_PROJECT = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_ID_CHARS)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')              # one JSON string literal
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BadInput(ValueError):
    """A request value this service refuses; ``str(exc)`` is a sentence for the sender."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def clip(value, limit: int = 80) -> str:
    """`value` shortened for a reply or a log line: a string as itself, cut after `limit` characters
    with "…" and its length; anything else as a short repr (nested lists/objects elided)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        return f"{value[:limit]}… ({len(value)} characters)"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def json_type(value) -> str:
    """The JSON name of a parsed value's type, with its article ("a string", "an object", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _max_depth(brackets: bytes) -> int:
    if not brackets:
        return 0
    a = np.frombuffer(brackets, np.uint8)
    return int(np.cumsum(np.where((a == ord("[")) | (a == ord("{")), 1, -1), dtype=np.int64).max())


def json_depth(raw: bytes) -> int:
    """How deeply the JSON text `raw` nests (``[]`` and ``{}``; brackets inside strings do not count).
    Linear time, no recursion: safe on any input (for invalid JSON the number is only indicative)."""
    fast = _max_depth(raw.translate(None, _NOT_BRACKET))      # counts brackets inside strings too
    if fast <= MAX_JSON_DEPTH:
        return fast
    return _max_depth(_STRING.sub(b'""', raw).translate(None, _NOT_BRACKET))


def _refuse_constant(name: str):
    raise BadInput(f"the request body is not valid JSON: {name} is not a JSON number")


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH):
    """A request body -> its JSON value. Raises BadInput with a sentence when the body is empty, not
    UTF-8 JSON, nested deeper than `max_depth`, holds NaN/Infinity, a number of more than 4300 digits
    or an unpaired surrogate."""
    if not raw or not raw.strip():
        raise BadInput("the request body is empty; send a JSON object")
    depth = json_depth(raw)
    if depth > max_depth:
        raise BadInput(f"the request body nests {depth} levels deep; at most {max_depth} are accepted")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except BadInput:
        raise
    except UnicodeDecodeError:
        raise BadInput("the request body is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:      # only for invalid JSON the depth scan misjudged
        raise BadInput("the request body nests too deeply to be read") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise BadInput("the request body holds a number of more than 4300 digits") from None
        raise BadInput(f"the request body is not valid JSON ({clip(str(exc), 120)})") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadInput("the request body holds a string with an unpaired UTF-16 surrogate (such as "
                           "\\ud800); send valid Unicode") from None
    return value


def project_id(value, what: str = "the project") -> str | None:
    """A Label Studio project reference -> its id (a string), or None when `value` is None or "".

    Accepts an integer, ``"<id>"`` or ``"<id>.<created unix ts>"`` (what Label Studio sends), or an
    object with such an ``"id"``. The id is at most 64 letters, digits, "_" or "-", so that it is safe
    in file names and Redis keys; anything else raises BadInput naming `what`."""
    if isinstance(value, dict):
        value = value.get("id")
        what = f"{what}'s id"
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MAX_DB_ID:
            return str(value)
        raise BadInput(f"{what} must be a Label Studio project id from 0 to 2^63-1, not {clip(value)}")
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        if _PROJECT.fullmatch(head):
            return head
        raise BadInput(f"{what} must be a Label Studio project id (digits, or \"<id>.<timestamp>\"; at most "
                       f"{MAX_ID_CHARS} letters, digits, '_' or '-'), not {clip(value)!r}")
    raise BadInput(f"{what} must be a Label Studio project id (an integer or a string), not {json_type(value)}")


def task_id(value):
    """A task's ``"id"`` -> itself when usable (None, an integer 0..2^63-1, or a string of at most 64
    printable characters); raises BadInput with a sentence otherwise."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MAX_DB_ID:
            return value
        raise BadInput(f"the task's id must be an integer from 0 to 2^63-1, not {clip(value)}")
    if isinstance(value, str):
        if 0 < len(value) <= MAX_ID_CHARS and value.isprintable():
            return value
        raise BadInput(f"the task's id must be an integer or a short printable string, not {clip(value)!r}")
    raise BadInput(f"the task's id must be an integer, not {json_type(value)}")
