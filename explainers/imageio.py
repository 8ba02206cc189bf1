"""Loading photos safely: any common mode becomes RGB uint8, EXIF orientation applied, size capped.

Every failure is an :class:`ImageLoadError` naming the file and the reason, so a caller can record
it for that photo and go on with the rest of its batch.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from explainers.errors import ImageLoadError

DEFAULT_MAX_PIXELS = int(os.environ.get("TAG2MASK_MAX_PIXELS", 40_000_000))

Source = Union[str, os.PathLike, bytes, BinaryIO]


def load_image(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Read a photo (path, bytes or file object) -> (H, W, 3) RGB uint8, EXIF-upright.

    Grayscale, palette, RGBA/LA (composited on white), CMYK and 16-bit photos are converted.
    Raises ImageLoadError for missing, empty, truncated or non-image input, and for photos above
    `max_pixels` (a guard against decompression bombs).
    """
    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise ImageLoadError(f"{label}: no such file")
        if os.path.isdir(source):
            raise ImageLoadError(f"{label}: is a directory, not a photo")
        if os.path.getsize(source) == 0:
            raise ImageLoadError(f"{label}: empty file")
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError(f"{label}: empty data")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageLoadError(f"{label}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                         "(TAG2MASK_MAX_PIXELS)")
                img.load()
                upright = ImageOps.exif_transpose(img)
                return to_rgb(upright)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{label}: refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{label}: not an image (format not recognised)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"{label}: unreadable or truncated image ({exc})") from exc
    except MemoryError as exc:
        raise ImageLoadError(f"{label}: too large to decode in memory") from exc
    except Exception as exc:  # a malformed file can break a decoder or the EXIF parser in any way
        raise ImageLoadError(f"{label}: cannot decode ({type(exc).__name__}: {exc})") from exc


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    if img.mode.startswith("I;16"):
        # 16-bit samples always span 0..65535: scale by 255/65535 (a dark photo stays dark).
        arr = np.asarray(img, dtype=np.float64)
        arr = np.rint(arr * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode == "I":
        # 32-bit integers (some 16-bit files open this way): 16-bit range when above 255, else 8-bit.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = np.rint(arr / (65535.0 if hi > 255 else 255.0) * 255.0).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
