"""Writing a dataset's files: atomically (a reader never sees half a file), and a photo placed into
a dataset's image folder.

Public API::

    write_text(path, text)                 # atomic: PATH.partial, then renamed over PATH
    write_json(path, obj)                  # compact JSON, UTF-8, atomic
    place_image(src, dst, mode="link")     # mode: "link" (hard link, else a copy), "copy", "symlink"
    IMAGE_MODES                            # ("link", "copy", "symlink")
    exif_rotated(path) -> bool             # its EXIF orientation turns the photo (then placed upright)

``link`` costs no disk and works on Windows (NTFS) and after the dataset folder is moved, but needs
the photo on the same file system: otherwise the photo is copied. ``symlink`` costs nothing either
but breaks when the photos move, and on Windows without developer mode; ``copy`` always works.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["IMAGE_MODES", "exif_rotated", "place_image", "write_json", "write_text"]

IMAGE_MODES = ("link", "copy", "symlink")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def exif_rotated(path: Path) -> bool:
    """Whether the photo's EXIF orientation turns or flips it (its stored pixels are not upright)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # noqa: BLE001 - not a readable image: nothing to turn (placing it reports the rest)
        return False


def place_image(src: Path, dst: Path, mode: str = "link") -> None:
    """Make the photo `src` reachable as `dst` (replacing what was there). A photo whose EXIF orientation
    turns it is written upright instead (re-encoded, without the orientation), in every mode: masks and
    normalised polygons are of the upright photo, and not every reader applies EXIF orientation."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}: use one of {', '.join(IMAGE_MODES)}")
    src, dst = Path(src).resolve(), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if not dst.is_symlink() and dst.resolve() == src:
            return                              # already this very file
        dst.unlink()
    if exif_rotated(src):
        _upright_copy(src, dst)
        return
    if mode == "symlink":
        os.symlink(src, dst)
        return
    if mode == "link":
        try:
            os.link(src, dst)
            return
        except OSError:                         # another file system, or links not allowed: copy
            pass
    shutil.copy2(src, dst)


def _upright_copy(src: Path, dst: Path) -> None:
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        upright = ImageOps.exif_transpose(im)
        exif = upright.getexif()
        exif.pop(0x0112, None)
        options = {"quality": 95} if (im.format or "").upper() == "JPEG" else {}
        tmp = dst.with_name(dst.name + ".partial")
        upright.save(tmp, format=im.format, exif=exif, **options)
    os.replace(tmp, dst)
