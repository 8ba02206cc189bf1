"""load_image on real photos and on real bad files made in tmp_path."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from explainers.errors import ImageLoadError
from explainers.imageio import load_image

# load_image must close every file it opens, also when it fails: an unclosed file fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning",
                                        "error::ResourceWarning")


def _stored(path) -> tuple[str, dict]:
    """(mode, info) of a file as PIL stores it."""
    with Image.open(path) as img:
        return img.mode, dict(img.info)


@pytest.fixture(scope="module")
def horse_jpeg(horse_dir) -> bytes:
    from conftest import horse_stems

    return (horse_dir / "images" / f"{horse_stems('test')[0]}.jpg").read_bytes()


def _png_header_only(width: int, height: int, mode_bits: tuple[int, int] = (8, 2)) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: the shape of a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bit_depth, colour_type = mode_bits
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- good inputs -------------------------------------------------------------------------------

def test_real_photo_from_path_bytes_and_file_object(horse_dir, horse_jpeg, tmp_path):
    from conftest import horse_stems

    path = horse_dir / "images" / f"{horse_stems('test')[0]}.jpg"
    img = load_image(path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    with Image.open(path) as raw:
        assert img.shape[:2] == raw.size[::-1]
    assert img.std() > 10  # a real photo, not a flat fill
    np.testing.assert_array_equal(load_image(horse_jpeg), img)
    np.testing.assert_array_equal(load_image(bytearray(horse_jpeg)), img)
    np.testing.assert_array_equal(load_image(io.BytesIO(horse_jpeg)), img)
    np.testing.assert_array_equal(load_image(str(path)), img)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    p = tmp_path / "grey.png"
    arr = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(arr, "L").save(p)
    img = load_image(p)
    assert img.shape == (12, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], arr)


def test_one_bit_image(tmp_path):
    p = tmp_path / "bits.png"
    arr = np.zeros((8, 8), bool)
    arr[2:5, 3:6] = True
    Image.fromarray(arr).convert("1").save(p)
    img = load_image(p)
    np.testing.assert_array_equal(img[:, :, 0] == 255, arr)


def test_rgba_is_composited_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    arr[0, 1] = (0, 0, 255, 255)    # opaque blue -> blue
    arr[0, 2] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    arr[1, :] = (10, 200, 30, 255)
    Image.fromarray(arr, "RGBA").save(p)
    img = load_image(p)
    assert img.shape == (2, 3, 3)
    assert tuple(img[0, 0]) == (255, 255, 255)
    assert tuple(img[0, 1]) == (0, 0, 255)
    assert all(abs(int(v) - 127) <= 1 for v in img[0, 2])  # 255 * (1 - 128/255)
    assert tuple(img[1, 2]) == (10, 200, 30)


def test_la_is_composited_on_white(tmp_path):
    p = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(p)
    assert (load_image(p) == 255).all()


def test_palette_png_with_transparency(tmp_path):
    p = tmp_path / "palette.png"
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.putdata([0, 0, 1, 1, 1, 1, 0, 0])  # index 0 = red but transparent, 1 = blue
    img.save(p, transparency=0)
    mode, info = _stored(p)
    assert mode == "P" and "transparency" in info
    out = load_image(p)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 2]) == (0, 0, 255)
    assert tuple(out[1, 3]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    assert _stored(p)[0] == "CMYK"
    img = load_image(p)
    assert img.shape == (16, 16, 3)
    r, g, b = (int(v) for v in img[8, 8])
    assert r > 235 and g < 20 and b < 20, (r, g, b)


def test_sixteen_bit_grey_png_is_scaled_to_eight_bits(tmp_path):
    p = tmp_path / "grey16.png"
    arr = np.array([[0, 65535, 32896], [25600, 257, 100]], np.uint16)
    Image.fromarray(arr).save(p)
    assert _stored(p)[0] == "I;16"
    img = load_image(p)
    assert img.dtype == np.uint8 and img.shape == (2, 3, 3)
    # 16-bit v -> round(v * 255 / 65535): 65535 -> 255, 32896 -> 128, 25600 -> 100, 257 -> 1, 100 -> 0
    np.testing.assert_array_equal(img[:, :, 0], [[0, 255, 128], [100, 1, 0]])


def test_dark_sixteen_bit_photo_stays_dark(tmp_path):
    """All samples <= 255 in a 16-bit file are very dark, not an 8-bit photo to show as is."""
    p = tmp_path / "dark16.png"
    Image.fromarray(np.full((4, 4), 200, np.uint16)).save(p)
    assert load_image(p).max() == 1


def test_sixteen_bit_rgb_png(tmp_path):
    p = tmp_path / "rgb16.png"
    bgr = np.zeros((3, 3, 3), np.uint16)
    bgr[1, 1] = (65535, 0, 32896)  # OpenCV writes B, G, R
    assert cv2.imwrite(str(p), bgr)
    img = load_image(p)
    assert img.dtype == np.uint8
    assert tuple(img[1, 1]) == (128, 0, 255)


def test_exif_orientation_6_is_applied(horse_jpeg, tmp_path):
    """Orientation 6: the stored pixels must be turned 90 degrees clockwise to stand upright."""
    stored = load_image(horse_jpeg)[:60, :90]
    p = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(p, quality=95, exif=exif)
    with Image.open(p) as stored_img:
        raw = np.asarray(stored_img.convert("RGB"))  # the decoded pixels, not turned
    assert raw.shape == (60, 90, 3)
    img = load_image(p)
    assert img.shape == (90, 60, 3)
    np.testing.assert_array_equal(img, np.rot90(raw, k=-1))  # k=-1: clockwise
    assert not np.array_equal(img, np.rot90(raw, k=1))


def test_exif_orientation_in_png(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)
    p = tmp_path / "rot8.png"
    exif = Image.Exif()
    exif[0x0112] = 8  # turn 90 degrees counter-clockwise
    Image.fromarray(arr).save(p, exif=exif)
    img = load_image(p)
    np.testing.assert_array_equal(img, np.rot90(arr, k=1))


# --- bad inputs --------------------------------------------------------------------------------

def _error(source, **kw) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kw)
    return str(info.value)


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.jpg")
    assert "nope.jpg" in msg and "no such file" in msg


def test_empty_file_and_empty_bytes(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "empty" in _error(p)
    assert "empty" in _error(b"")


def test_directory(tmp_path):
    assert "directory" in _error(tmp_path)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a photo\n" * 20)
    msg = _error(p)
    assert "notes.jpg" in msg and "not an image" in msg


def test_truncated_jpeg(horse_jpeg, tmp_path):
    p = tmp_path / "half.jpg"
    p.write_bytes(horse_jpeg[: len(horse_jpeg) // 2])
    msg = _error(p)
    assert "half.jpg" in msg and "truncated" in msg
    assert "truncated" in _error(horse_jpeg[: len(horse_jpeg) // 2], name="upload-7")
    assert "upload-7" in _error(horse_jpeg[:100], name="upload-7")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    assert "image" in _error(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_header_only_bomb_over_our_limit(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(9000, 9000))  # 81 M pixels claimed, in ~100 bytes
    assert p.stat().st_size < 200
    msg = _error(p, max_pixels=1_000_000)
    assert "9000x9000" in msg and "limit" in msg and "1,000,000" in msg


def test_bomb_over_pils_own_limit(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(_png_header_only(20000, 20000))  # 400 M pixels > 2 x PIL's MAX_IMAGE_PIXELS
    assert "decompression bomb" in _error(p, max_pixels=10**12)
    assert "limit" in _error(p)  # the default limit refuses it before PIL does


def test_bomb_between_pils_warning_and_error(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(_png_header_only(10000, 10000))  # 100 M: PIL only warns; we refuse
    assert "decompression bomb" in _error(p, max_pixels=10**12)


def test_real_large_png_refused_by_max_pixels(tmp_path):
    p = tmp_path / "large.png"
    Image.new("1", (4000, 3000)).save(p)  # a valid 12 M pixel PNG of a few kB
    assert p.stat().st_size < 100_000
    msg = _error(p, max_pixels=5_000_000)
    assert "4000x3000" in msg
    assert load_image(p, max_pixels=20_000_000).shape == (3000, 4000, 3)
