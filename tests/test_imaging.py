"""Decoding and refusing images: every bad input names its problem."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage

from services.api.image_pb2 import Image
from services.errors import InvalidImageError
from services.imaging import ImageFormat, ImageLimits, decode_image, image_size, sniff_format
from tests.helpers import jpeg, photo

LIMITS = ImageLimits()


def png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()


def pil_bytes(image: PILImage.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of side×side black pixels: a few hundred KB, gigabytes as RGB."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def with_jpeg_size(content: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in a JPEG's SOF0 header."""
    sof = content.index(b"\xff\xc0")
    return content[: sof + 5] + struct.pack(">HH", height, width) + content[sof + 9 :]


def decode(content: bytes, image_type: int = Image.IMAGE_TYPE_UNSPECIFIED, limits: ImageLimits = LIMITS) -> np.ndarray:
    return decode_image(Image(content=content, image_type=image_type), limits)


COFFEE = photo("coffee")


def test_sniffs_jpeg_and_png() -> None:
    assert sniff_format(jpeg(COFFEE)) is ImageFormat.JPEG
    assert sniff_format(png(COFFEE)) is ImageFormat.PNG
    assert sniff_format(b"GIF89a....") is None


@pytest.mark.parametrize("image_type", [Image.IMAGE_TYPE_UNSPECIFIED, Image.JPEG])
def test_decodes_jpeg_to_rgb(image_type: int) -> None:
    pixels = decode(jpeg(COFFEE, quality=95), image_type)
    assert pixels.shape == COFFEE.shape
    assert pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - COFFEE).mean() < 3  # RGB order kept, not BGR


def test_decodes_png_to_rgb_exactly() -> None:
    pixels = decode(png(cv2.cvtColor(COFFEE, cv2.COLOR_RGB2BGR)), Image.PNG)
    assert np.array_equal(pixels, COFFEE)


@pytest.mark.parametrize(
    ("content", "image_type"),
    [
        pytest.param(pil_bytes(PILImage.fromarray(COFFEE).convert("L"), "JPEG"), Image.JPEG, id="gray-jpeg"),
        pytest.param(pil_bytes(PILImage.fromarray(COFFEE).convert("CMYK"), "JPEG"), Image.JPEG, id="cmyk-jpeg"),
        pytest.param(png(COFFEE[:, :, 0]), Image.PNG, id="gray-png"),
        pytest.param(png(COFFEE.astype(np.uint16) * 257), Image.PNG, id="16bit-png"),
        pytest.param(png(np.dstack([COFFEE, np.full(COFFEE.shape[:2], 128, np.uint8)])), Image.PNG, id="rgba-png"),
    ],
)
def test_converts_other_pixel_formats_to_8bit_rgb(content: bytes, image_type: int) -> None:
    pixels = decode(content, image_type)
    assert pixels.shape == (*COFFEE.shape[:2], 3)
    assert pixels.dtype == np.uint8


@pytest.mark.parametrize(
    ("content", "image_type", "message"),
    [
        pytest.param(b"", Image.JPEG, "image content is empty", id="empty"),
        pytest.param(b"definitely not an image", Image.JPEG, "content is neither JPEG nor PNG", id="not-image"),
        pytest.param(b"GIF89a" + b"\x00" * 64, Image.IMAGE_TYPE_UNSPECIFIED, "neither JPEG nor PNG", id="gif"),
        pytest.param(jpeg(COFFEE)[:5000], Image.JPEG, "cannot decode image", id="truncated-jpeg"),
        pytest.param(png(COFFEE)[:5000], Image.PNG, "cannot decode image", id="truncated-png"),
        pytest.param(png(COFFEE)[:20], Image.PNG, "PNG header is truncated", id="png-header-only"),
        pytest.param(b"\xff\xd8\xff\xe0" + b"\x00" * 20, Image.JPEG, "bad JPEG header", id="jpeg-magic-only"),
        pytest.param(png(COFFEE), Image.JPEG, "content is PNG but image_type says JPEG", id="png-as-jpeg"),
        pytest.param(jpeg(COFFEE), Image.PNG, "content is JPEG but image_type says PNG", id="jpeg-as-png"),
    ],
)
def test_refuses_bad_images_with_a_named_problem(content: bytes, image_type: int, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        decode(content, image_type)


def test_refuses_images_over_the_byte_limit() -> None:
    content = jpeg(COFFEE)
    with pytest.raises(InvalidImageError, match=rf"image too big: {len(content)} bytes > limit 1000 bytes"):
        decode(content, Image.JPEG, ImageLimits(max_bytes=1000))


def test_refuses_a_png_decompression_bomb_from_its_header() -> None:
    bomb = png_bomb(50_000)
    assert len(bomb) <= LIMITS.max_bytes  # small enough to get past the byte limit: 7.5 GB only as RGB pixels
    assert image_size(bomb, ImageFormat.PNG) == (50_000, 50_000)
    with pytest.raises(InvalidImageError, match="image resolution too high: 50000×50000 > 20 MP"):
        decode(bomb, Image.PNG)


def test_refuses_a_jpeg_over_20_megapixels_from_its_header() -> None:
    huge = with_jpeg_size(jpeg(COFFEE), 6000, 4000)  # 24 MP declared, a few KB of data
    with pytest.raises(InvalidImageError, match="image resolution too high: 6000×4000 > 20 MP"):
        decode(huge, Image.JPEG)


def test_accepts_an_image_at_the_pixel_limit() -> None:
    pixels = decode(jpeg(COFFEE), Image.JPEG, ImageLimits(max_pixels=COFFEE.shape[0] * COFFEE.shape[1]))
    assert pixels.shape == COFFEE.shape
