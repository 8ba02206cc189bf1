"""Tags (what a person types: "horse", "dog", "tvmonitor") -> sets of classifier classes.

A tag resolves, in this order, to:
1. ``extra``: explicit class names given with the tag (Label Studio's ``predicted_values="sorrel,..."``);
   an entry may also be a group tag ("horse") when the classifier is the ImageNet-1k one;
2. a group of ImageNet-1k classes ("dog" = the 118 dog breeds, "cat" = the 5 domestic cats, the
   PASCAL VOC and COCO class names that ImageNet-1k covers, ...) or a synonym of a group or class
   ("kitty", "motorbike", "aeroplane", "couch", "tvmonitor"...);
3. one exact class name of the classifier (case-insensitive: "sorrel", "Egyptian cat"), or its index
   as a string ("339").
Step 2 is only for the 1000 ImageNet-1k classes; a classifier with other classes (``categories``)
gets 1 and 3. A plural ("horses", "buses") is tried as its singular when nothing else matched.

The mapping lives in ``explainers/data/tag_map.json``, generated and checked against torchvision's
class names by ``scripts/make_tag_map.py`` (its docstring, and the JSON's ``notes``, give the choices:
big cats are not "cat", zebra is not "horse", ...). Where ImageNet-1k has no class of a tag's name but
one fits, the tag's group holds the nearest classes ("oven" -> stove, "donut" -> bagel); the reason is
:func:`nearest_reason`. Tags it has no class for at all (person, giraffe, sky, grass, the toy "kite" ...)
are refused on purpose: they raise :class:`~explainers.errors.RefusedTagError` (an
:class:`UnknownTagError`) with a sentence saying why (:func:`refusal_reason`); other unknown tags raise
:class:`UnknownTagError` with close matches.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from explainers.errors import RefusedTagError, UnknownTagError

TAG_MAP_PATH = Path(__file__).resolve().parent / "data" / "tag_map.json"
SOURCES = ("imagenet", "synonym", "group", "extra")


@dataclass(frozen=True)
class TagClasses:
    """The classes a tag stands for."""

    tag: str
    """The tag as given (outer spaces removed, case kept: it is the label to give back)."""
    indices: tuple[int, ...]
    """Class indices into the classifier's categories, without repeats."""
    names: tuple[str, ...]
    """The class names, in the order of `indices`."""
    source: str
    """How it was found: "extra", "group", "synonym" or "imagenet" (an exact class name or index)."""
    canonical: str = ""
    """The group tag or class name it resolved to (e.g. "aeroplane" for "plane")."""


def normalise(tag: str) -> str:
    """The lookup form of a tag: lower case, '_' as a space, single spaces, no outer spaces."""
    return " ".join(str(tag).replace("_", " ").lower().split())


@lru_cache(maxsize=1)
def tag_map() -> dict:
    """The generated mapping document (groups, synonyms, unsupported tags, reverse map, notes)."""
    with open(TAG_MAP_PATH, encoding="utf-8") as f:
        return json.load(f)


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names as stored in the tag map (torchvision's list)."""
    return list(tag_map()["imagenet_categories"])


@lru_cache(maxsize=8)
def _name_index(categories: tuple[str, ...]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(exact name -> index, normalised name -> indices) for a class list."""
    exact = {name: i for i, name in enumerate(categories)}
    folded: dict[str, list[int]] = {}
    for i, name in enumerate(categories):
        folded.setdefault(normalise(name), []).append(i)
    return exact, folded


def _categories(categories: Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """The class list to use, and whether it is ImageNet-1k's (so groups apply)."""
    imagenet = tuple(tag_map()["imagenet_categories"])
    if categories is None:
        return imagenet, True
    cats = tuple(categories)
    return cats, cats == imagenet


def _class_index(name: str, cats: tuple[str, ...]) -> int | None:
    """Index of one class by exact name, by unique case-insensitive name, or by index string.

    Raises UnknownTagError when the name matches several classes once case is ignored.
    """
    exact, folded = _name_index(cats)
    name = " ".join(str(name).split())
    if name in exact:
        return exact[name]
    key = normalise(name)
    hits = folded.get(key, [])
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        which = ", ".join(f"{cats[i]!r} ({i})" for i in hits)
        raise UnknownTagError(f"tag {name!r} matches several classes once case is ignored: {which}; "
                              "spell it exactly")
    if key.isdigit() and int(key) < len(cats):
        return int(key)
    return None


def _result(tag: str, indices: Iterable[int], cats: tuple[str, ...], source: str, canonical: str) -> TagClasses:
    unique = tuple(dict.fromkeys(int(i) for i in indices))
    return TagClasses(tag=tag, indices=unique, names=tuple(cats[i] for i in unique), source=source,
                      canonical=canonical)


def _lookup_group(key: str) -> tuple[list[int], str, str] | None:
    """(indices, source, canonical) for a group or synonym tag of the ImageNet map, else None."""
    doc = tag_map()
    if key in doc["groups"]:
        return list(doc["groups"][key]["indices"]), "group", key
    syn = doc["synonyms"].get(key)
    if syn is None:
        return None
    if "group" in syn:
        return list(doc["groups"][syn["group"]]["indices"]), "synonym", syn["group"]
    name = syn["imagenet"]
    return [doc["imagenet_categories"].index(name)], "synonym", name


def _suggestions(key: str, cats: tuple[str, ...], is_imagenet: bool, extra_keys: Iterable[str]) -> list[str]:
    pool = {normalise(c): c for c in cats}
    if is_imagenet:
        pool.update({t: t for t in known_tags()})
    pool.update({k: k for k in extra_keys})
    close = difflib.get_close_matches(key, list(pool), n=5, cutoff=0.6)
    return list(dict.fromkeys(pool[c] for c in close))


def refusal_reason(tag: str) -> str | None:
    """Why the ImageNet-1k classifier refuses `tag` (a sentence), or None when it is not refused on purpose.
    A plural is looked up as its singular ("persons" -> "person")."""
    doc = tag_map()["unsupported"]
    key = normalise(tag)
    for k in (key, key[:-1] if key.endswith("s") else "", key[:-2] if key.endswith("es") else ""):
        if k and k in doc:
            hint = doc[k]
            return doc[hint[5:-1]] if hint.startswith("see ") else hint
    return None


def _refused(tag: str, key: str) -> RefusedTagError | None:
    reason = refusal_reason(key)
    if reason is None:
        return None
    return RefusedTagError(f"tag {tag!r} has no class in the ImageNet-1k classifier: {reason}",
                           tag=tag, reason=reason)


def nearest_reason(tag: str) -> str | None:
    """Why a tag maps to the nearest ImageNet-1k classes rather than a class of its name ("oven" -> stove),
    with what the classifier gives on the dev photos; None for other tags. Synonyms and plurals
    ("doughnuts") too."""
    try:
        resolved = resolve_tag(tag)
    except UnknownTagError:
        return None
    if resolved.source not in ("group", "synonym"):
        return None
    return tag_map().get("nearest", {}).get(resolved.canonical)


def _unknown(tag: str, key: str, cats: tuple[str, ...], is_imagenet: bool, extra_keys: Iterable[str]) -> UnknownTagError:
    doc = tag_map()
    refused = _refused(tag, key) if is_imagenet else None
    if refused is not None:
        return refused
    if not is_imagenet and (key in doc["groups"] or key in doc["synonyms"]):
        return UnknownTagError(f"tag {tag!r} is a group of ImageNet-1k classes, but this classifier has "
                               f"{len(cats)} other classes; use one of its class names or give the classes explicitly")
    close = _suggestions(key, cats, is_imagenet, extra_keys)
    msg = f"unknown tag {tag!r}"
    msg += f": did you mean {', '.join(close)}?" if close else \
        " (not a class name of the classifier" + (", nor a known tag; see explainers.tags.known_tags())" if is_imagenet else ")")
    return UnknownTagError(msg)


def _split_names(names: str | Iterable[str]) -> list[str]:
    if isinstance(names, str):
        names = re.split(r"[,;\n]", names)
    return [" ".join(n.split()) for n in names if n and n.strip()]


def resolve_tag(tag: str, categories: Sequence[str] | None = None,
                extra: Mapping[str, str | Sequence[str]] | None = None) -> TagClasses:
    """The classifier classes that `tag` stands for.

    `categories`: the classifier's class names (default: ImageNet-1k's 1000). `extra`: tag -> class
    names (a list, or one comma-separated string), taking precedence over everything else.
    Raises RefusedTagError (ImageNet-1k only) for a tag it has no class for on purpose ("person",
    "sky", "kite"), with the reason, and UnknownTagError (with close matches) when the tag matches nothing.
    """
    label = " ".join(str(tag).split())
    key = normalise(tag)
    if not key:
        raise UnknownTagError("empty tag")
    cats, is_imagenet = _categories(categories)
    extra_norm = {normalise(k): v for k, v in (extra or {}).items()}

    if key in extra_norm:
        indices: list[int] = []
        for name in _split_names(extra_norm[key]):
            i = _class_index(name, cats)
            if i is not None:
                indices.append(i)
                continue
            group = _lookup_group(normalise(name)) if is_imagenet else None
            if group is None:
                err = _unknown(name, normalise(name), cats, is_imagenet, ())
                raise UnknownTagError(f"classes given for tag {label!r}: {err}")
            indices.extend(group[0])
        if not indices:
            raise UnknownTagError(f"no classes given for tag {label!r}")
        return _result(label, indices, cats, "extra", key)

    candidates = [key]
    if key.endswith("es"):
        candidates += [key[:-1], key[:-2]]
    elif key.endswith("s"):
        candidates.append(key[:-1])
    for attempt in candidates:
        if is_imagenet:
            group = _lookup_group(attempt)
            if group is not None:
                return _result(label, group[0], cats, group[1], group[2])
            if attempt in tag_map()["unsupported"]:   # before class names: "kite" (the toy) is not class 21
                raise _refused(label, attempt)
        i = _class_index(label if attempt == key else attempt, cats)
        if i is not None:
            return _result(label, [i], cats, "imagenet", cats[i])
    raise _unknown(label, key, cats, is_imagenet, extra_norm)


def resolve_tags(tags: str | Iterable[str], categories: Sequence[str] | None = None,
                 extra: Mapping[str, str | Sequence[str]] | None = None) -> list[TagClasses]:
    """:func:`resolve_tag` for each tag (a list, or one string that :func:`parse_tags` splits)."""
    if isinstance(tags, str):
        tags = parse_tags(tags)
    return [resolve_tag(t, categories, extra) for t in tags]


def parse_tags(text: str) -> list[str]:
    """Split "horse, person ;dog" on commas, semicolons and new lines -> ["horse", "person", "dog"].

    Spaces are tidied, empty items dropped, repeats (ignoring case) dropped; case is kept.
    """
    seen: set[str] = set()
    out = []
    for item in re.split(r"[,;\n]", text or ""):
        item = " ".join(item.split())
        if item and normalise(item) not in seen:
            seen.add(normalise(item))
            out.append(item)
    return out


def known_tags() -> list[str]:
    """Group tags and synonyms (sorted). Every ImageNet-1k class name is accepted as well."""
    doc = tag_map()
    return sorted(set(doc["groups"]) | set(doc["synonyms"]))


def group_tags() -> list[str]:
    """The group tags only (no synonyms), in the map's order (PASCAL VOC / COCO names first)."""
    return list(tag_map()["groups"])


def unsupported_tags() -> dict[str, str]:
    """Tags that ImageNet-1k has no class for, refused on purpose, with the reason (as stored: an entry may
    read "see 'person'"; :func:`refusal_reason` follows it)."""
    return dict(tag_map()["unsupported"])


def tag_for_class(index: int) -> str | None:
    """The group tag of an ImageNet-1k class (339 -> "horse", 207 -> "dog"), or None if it is in none.

    A class in several groups gets the first in the map's order (VOC / COCO names first: 656 minivan ->
    "car", not "van").
    """
    return tag_map()["class_tags"].get(str(int(index)))


def top_tags(probs: np.ndarray | Sequence[float], k: int = 5,
             categories: Sequence[str] | None = None) -> list[tuple[str, float]]:
    """The classifier's own tags: softmax probabilities (num_classes,) summed per group tag.

    A class in no group counts under its own name. With custom `categories` every class is its own tag.
    Returns the `k` most probable (tag, probability), most probable first.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    cats, is_imagenet = _categories(categories)
    if len(p) != len(cats):
        raise ValueError(f"{len(p)} probabilities for {len(cats)} classes")
    totals: dict[str, float] = {}
    for i, name in enumerate(cats):
        tag = (tag_for_class(i) if is_imagenet else None) or name
        totals[tag] = totals.get(tag, 0.0) + float(p[i])
    return sorted(totals.items(), key=lambda kv: -kv[1])[:k]
