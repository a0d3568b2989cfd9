"""Images for the image tests, ordinary and hostile, made here byte by byte (no files checked in).

The hostile ones are what an attacker sends: headers that declare far more pixels than the bytes
hold (a decompression bomb), files cut short, wrong formats under an image name, animations, an
EXIF block larger than any camera writes, and extreme aspect ratios.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo(h: int = 480, w: int = 640, seed: int = 0) -> Image.Image:
    """A smooth gradient with some noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx * 3 + yy + seed * 40) % 256], -1)
    return Image.fromarray(((base + rng.integers(0, 24, (h, w, 3))) % 256).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A valid PNG header declaring w x h RGB pixels, with two rows of zeros compressed (~50 kB at 30000)."""
    raw = zlib.compress(b"\x00" * (1 + w * 3) * 2, 9)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", raw) + _chunk(b"IEND", b""))  # fmt: skip


def jpeg_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims w x h."""
    data = bytearray(encode(photo(8, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def webp_bomb(w: int = 16384, h: int = 16384) -> bytes:
    """A 1x1 lossless WebP whose VP8L header claims w x h (14 bits each: 16384 is the most it can say)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = int.from_bytes(data[at + 1 : at + 5], "little")
    bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)
    data[at + 1 : at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def truncated_jpeg() -> bytes:
    full = encode(photo(), "JPEG")
    return full[: len(full) // 2]


def animated(fmt: str) -> bytes:
    frames = [photo(32, 32, seed) for seed in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def huge_exif_png(size: int = 200_000) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * size  # ImageDescription
    return encode(photo(16, 16), "PNG", exif=exif)


def strip(w: int = 1, h: int = 100_000) -> bytes:
    return encode(Image.new("RGB", (w, h), (200, 100, 50)), "PNG")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="30000" height="30000"><rect width="1" height="1"/></svg>'


def hostile() -> dict[str, tuple[bytes, int]]:
    """Name -> (bytes, the status the server must answer)."""
    return {
        "png bomb 30000x30000": (png_bomb(), 413),
        "jpeg bomb 30000x30000": (jpeg_bomb(), 413),
        "webp bomb 16384x16384": (webp_bomb(), 413),
        "png 8000x8000 (64 MP)": (png_bomb(8000, 8000), 413),
        "truncated jpeg": (truncated_jpeg(), 400),
        "wrong magic": (b"\x89PNX" + bytes(range(256)) * 4, 400),
        "huge exif": (huge_exif_png(), 400),
        "animated gif": (animated("GIF"), 400),
        "animated webp": (animated("WEBP"), 400),
        "animated png": (animated("PNG"), 400),
        "svg": (SVG, 400),
        "empty": (b"", 400),
    }
